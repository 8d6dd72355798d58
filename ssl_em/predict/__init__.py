"""Blockwise prediction of large volumes (:func:`predict_volume`); instance segmentation lives in
:mod:`ssl_em.predict.instances` (in memory) and :func:`blockwise_instances` (larger than memory, global ids)."""

from __future__ import annotations

from ssl_em.predict.blockwise import predict_volume as predict_volume
from ssl_em.predict.stitch import blockwise_instances as blockwise_instances

__all__ = ["blockwise_instances", "predict_volume"]
