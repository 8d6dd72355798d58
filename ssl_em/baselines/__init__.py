"""Baselines users train instead of ssl-em, on the same labels: an ilastik-style pixel classifier
(:class:`PixelClassifier`). The plain U-Net baseline is ``FineTuning(network="monai_unet")``."""

from __future__ import annotations

from ssl_em.baselines.pixel_classifier import PixelClassifier as PixelClassifier, section_features as section_features

__all__ = ["PixelClassifier", "section_features"]
