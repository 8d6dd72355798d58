"""Procedural serial-section EM phantom of neuropil with exact ground truth.

The phantom stands in for real EM wherever the project cannot ship any (the demo, tests,
examples). It imitates anisotropic ssTEM (e.g. 40 x 8 x 8 nm voxels, z, y, x):

* **Neurites** are tubes running mostly along z. Seed ellipses of physical diameter are packed in
  the plane, advected from section to section by a smooth divergence-free drift field (so
  neighbours move together and seldom cross) and grown into a multiplicatively weighted Voronoi
  partition (elliptical distance / radius), whose curved boundaries wrap round small profiles as
  in real neuropil. A smooth displacement field makes membranes undulate. Each id is one 3-D
  connected piece (6-connectivity).
* **Membranes** are the in-plane band (``membrane_thickness_nm``) where two cells meet; there
  ``neurons`` is 0, exactly as in per-section EM annotations.
* **Mitochondria** are capsules (180-420 nm wide, up to ~1.2 um long; some along the neurite,
  most oblique or in-plane), clipped to their host cell's cytoplasm, rendered darker with a dark
  double membrane and stripe-like cristae.
* **Synaptic clefts** are patches of the membrane between two cells, with a dark postsynaptic
  density on one side and a cloud of ~40 nm vesicles (light centre, dark rim) on the other.
* **Imaging**: low- and high-frequency cytoplasm texture, blur mostly along z (section
  thickness), section-wise gain/offset and illumination ramps, Poisson-like shot noise, and
  optional missing sections (raw only; labels stay intact).

Everything is vectorised numpy/scipy in float32; raw is rendered in z-slabs, and per-section
noise is drawn from per-section seeds, so the result depends only on ``seed`` and the arguments.
A 128 x 256 x 256 volume takes a few seconds on one core.
"""

from __future__ import annotations

from ssl_em.data.phantom.build import make_phantom as make_phantom
from ssl_em.data.phantom.cli import main as main
from ssl_em.data.phantom.files import save_phantom as save_phantom
from ssl_em.data.phantom.files import save_preview as save_preview
from ssl_em.data.phantom.tissue import Phantom as Phantom
from ssl_em.data.phantom.tissue import PhantomConfig as PhantomConfig

__all__ = ["Phantom", "PhantomConfig", "main", "make_phantom", "save_phantom", "save_preview"]
