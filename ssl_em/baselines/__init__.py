"""Baselines users train instead of ssl-em, on the same labels: an ilastik-style pixel classifier
(:class:`PixelClassifier`) and the plain U-Net (:class:`PlainUNet`, trained as ``FineTuning(network="unet")``)."""

from __future__ import annotations

from ssl_em.baselines.pixel_classifier import PixelClassifier as PixelClassifier, section_features as section_features

from ssl_em.baselines.unet import PlainUNet as PlainUNet

__all__ = ["PixelClassifier", "PlainUNet", "section_features"]
