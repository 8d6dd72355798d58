"""Blockwise prediction of large volumes (:func:`predict_volume`); instance segmentation lives in
:mod:`ssl_em.predict.instances`."""

from __future__ import annotations

from ssl_em.predict.blockwise import predict_volume as predict_volume

__all__ = ["predict_volume"]
