"""The ilastik-style pixel classifier users train instead of a network: a filter bank + a random forest.

ilastik's default feature set, computed per z-section in 2D (ssTEM sections are 4-10x thicker than
their pixels, which is how ilastik users set it up for such data), in float32, one section at a
time, so a 20 x 1024 x 1024 volume never holds more than one section's features (~200 MB):

* Gaussian smoothing, Laplacian of Gaussian, Gaussian gradient magnitude, difference of Gaussians
  (sigma and 0.66 sigma), structure-tensor eigenvalues (inner scale sigma / 2), Hessian-of-Gaussian
  eigenvalues, at sigma 0.7, 1.0, 1.6, 3.5, 5.0 and 10.0 pixels, plus the raw intensity.

The forest (scikit-learn, 100 trees) trains on labelled pixels sampled from the annotated sections
or painted patches (at most ``max_samples``, foreground oversampled as ilastik users paint it), and
predicts foreground probabilities section by section. Its out-of-bag predictions of the sampled
pixels (:meth:`PixelClassifier.out_of_bag`) stand in for held-out ones where no labelled voxel is left
over, e.g. to choose a threshold from a few painted patches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SIGMAS = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)


def section_features(section: np.ndarray, sigmas: Sequence[float] = SIGMAS) -> np.ndarray:
    """(H, W) section -> (H, W, F) float32 features (F = 1 + 8 per sigma)."""
    from scipy import ndimage as ndi
    from skimage.feature import (hessian_matrix, hessian_matrix_eigvals, structure_tensor,
                                 structure_tensor_eigenvalues)

    x = np.asarray(section, dtype=np.float32)
    feats = [x]
    for s in sigmas:
        g = ndi.gaussian_filter(x, s)
        feats += [g, ndi.gaussian_laplace(x, s), ndi.gaussian_gradient_magnitude(x, s),
                  g - ndi.gaussian_filter(x, 0.66 * s)]
        st = structure_tensor(x, sigma=s, order="rc")
        feats += list(structure_tensor_eigenvalues(st).astype(np.float32))
        h = hessian_matrix(x, sigma=s, order="rc", use_gaussian_derivatives=False)
        feats += list(hessian_matrix_eigvals(h).astype(np.float32))
    return np.stack(feats, axis=-1).astype(np.float32, copy=False)


@dataclass
class PixelClassifier:
    """Random forest on :func:`section_features`; ``fit`` on labelled pixels, ``predict`` per section.

    ``fit(raw, labels, mask)``: raw (z, y, x) normalised to 0..1, binary labels, mask > 0 where labels
    hold (annotated sections or painted patches). ``predict(raw) -> (z, y, x)`` foreground probability.
    ``keep_out_of_bag``: also score each training pixel with the trees that did not see it
    (:meth:`out_of_bag`; a few seconds per forest, so only where a caller reads them).
    """

    n_trees: int = 100
    max_samples: int = 60_000
    foreground_share: float = 0.5
    sigmas: tuple[float, ...] = SIGMAS
    seed: int = 0
    n_jobs: int = 2
    keep_out_of_bag: bool = False
    forest: Any = field(default=None, repr=False)
    _sample: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # (classes, weights) fitted

    def fit(self, raw: np.ndarray, labels: np.ndarray, mask: np.ndarray,
            progress: Callable[[str], None] | None = None) -> PixelClassifier:
        from sklearn.ensemble import RandomForestClassifier

        from ssl_em.errors import LabelError

        rng = np.random.default_rng(self.seed)
        sections = [z for z in range(raw.shape[0]) if np.any(mask[z] > 0)]
        if not sections:
            raise LabelError("the pixel classifier got no labelled pixel (mask is all 0)")
        fg_total = sum(int(((labels[z] > 0) & (mask[z] > 0)).sum()) for z in sections)
        bg_total = sum(int(((labels[z] == 0) & (mask[z] > 0)).sum()) for z in sections)
        n_fg = min(fg_total, int(self.max_samples * self.foreground_share))
        n_bg = min(bg_total, self.max_samples - n_fg)
        xs, ys = [], []
        for z in sections:  # features of one section at a time; keep only the sampled pixels
            feats = section_features(raw[z], self.sigmas)
            for cls, n, total in ((1, n_fg, fg_total), (0, n_bg, bg_total)):
                where = np.flatnonzero(((labels[z] > 0) == bool(cls)) & (mask[z] > 0))
                take = min(where.size, int(round(n * where.size / max(total, 1))))
                if take:
                    pick = rng.choice(where, size=take, replace=False)
                    xs.append(feats.reshape(-1, feats.shape[-1])[pick])
                    ys.append(np.full(take, cls, np.uint8))
            if progress:
                progress(f"rf features: section {z}")
        y = np.concatenate(ys)
        if y.min() == y.max():
            raise LabelError("the pixel classifier needs labelled foreground and background pixels")
        self.forest = RandomForestClassifier(n_estimators=self.n_trees, n_jobs=self.n_jobs, random_state=self.seed,
                                             min_samples_leaf=2, oob_score=self.keep_out_of_bag)
        self.forest.fit(np.concatenate(xs), y)
        # each sampled pixel stands for this many labelled pixels of its class (foreground is oversampled)
        weights = np.where(y == 1, fg_total / max(int((y == 1).sum()), 1), bg_total / max(int((y == 0).sum()), 1))
        self._sample = (y, weights.astype(np.float32))
        return self

    def out_of_bag(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(probabilities, truth, weights)`` of the pixels the forest trained on: each pixel's foreground
        probability from the trees that did not see it (so not the near-perfect fit of its own training
        pixels), its class, and how many labelled pixels of its class it stands for."""
        from ssl_em.errors import ConfigError

        if self.forest is None or self._sample is None:
            raise ConfigError("PixelClassifier.out_of_bag before fit")
        if not self.keep_out_of_bag:
            raise ConfigError("PixelClassifier.out_of_bag: fitted without keep_out_of_bag=True")
        probs = np.nan_to_num(self.forest.oob_decision_function_[:, 1], nan=0.5).astype(np.float32)
        return probs, self._sample[0].astype(bool), self._sample[1]

    def predict(self, raw: np.ndarray) -> np.ndarray:
        if self.forest is None:
            from ssl_em.errors import ConfigError

            raise ConfigError("PixelClassifier.predict before fit")
        out = np.empty(raw.shape, np.float32)
        for z in range(raw.shape[0]):
            feats = section_features(raw[z], self.sigmas)
            out[z] = self.forest.predict_proba(feats.reshape(-1, feats.shape[-1]))[:, 1].reshape(raw.shape[1:])
        return out
