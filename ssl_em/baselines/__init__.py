"""Baselines users train instead of ssl-em, on the same labels: an ilastik-style pixel classifier
(:class:`PixelClassifier`). The plain U-Net users train is ssl-em's own encoder family
(:mod:`ssl_em.models.unet`) from random init: the study's ``unet`` and ``scratch`` controls."""

from __future__ import annotations

from ssl_em.baselines.pixel_classifier import PixelClassifier as PixelClassifier, section_features as section_features

__all__ = ["PixelClassifier", "section_features"]
