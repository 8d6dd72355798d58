"""Packages are found, not listed: every package under ``ssl_em/``, and ``adapters/`` installed as
``ssl_em.adapters`` (the PyPI distribution "adapters" owns the top-level name). Everything else about
the build is in pyproject.toml; pyproject cannot express a found package under a mapped folder."""

from setuptools import find_packages, setup

adapters = ["ssl_em.adapters", *(f"ssl_em.adapters.{name}" for name in find_packages("adapters"))]
setup(
    packages=[*find_packages(include=["ssl_em", "ssl_em.*"]), *adapters],
    package_dir={"ssl_em.adapters": "adapters"},
)
