"""Instance segmentation of volumes larger than memory, block by block, with consistent global ids.

Three passes over a block grid (``block_shape`` = the output's chunk shape), every task bounded by
one block + halo in memory::

    1 segment   read block + halo of the probability map, segment it with an in-memory method of
                :mod:`ssl_em.predict.instances`, write the core's labels (block key << 32 | local id)
                to a scratch zarr array, keep the halo's labels and per-id voxel counts on disk
    2 match     overlap each block's halo labels with the neighbours' written core labels: pairs of
                ids that are one object (the halo of a block covers all 26 neighbours, so objects
                crossing faces, edges and corners are found)
    3 relabel   union-find over the pairs (scipy connected components on a graph of only the ids
                that touch a halo), global sizes summed over blocks, small objects dropped, and
                every block rewritten with consecutive ids 1..n

Exactness. ``method="components"`` uses a one-voxel halo and joins every foreground pair that
touches across a block boundary: the result equals connected components of the whole volume up to
relabelling, whatever the block shape (tested). The halo methods (``"watershed"``, ``"mito"``,
``"affinities"``) segment block + ``halo`` and compare labels only in the inner half of the halo
(near a region's edge objects are cut off and seeds missing); a halo id and a neighbour's id join
when their overlap there covers ``min_overlap`` (0.5) of *both* (of the smaller alone, an object
that grazes the halo would join its neighbour). The partition then equals the in-memory method's
exactly when, within half a halo of each core, the block's segmentation equals the whole volume's:
roughly halo >= the diameter of the objects plus the reach of seeding/flooding. Tested: ~10-voxel
cells in (8, 24, 24) blocks are exact from halo (4, 8, 8); with a (2, 4, 4) halo objects merge at
seams. Flat plateaus in the map are flooded in visiting order, so their voxels may differ from
the in-memory result in any case (a few boundary voxels, never whole objects).

CLI: ``ssl-em predict --model FINETUNED --input ... --output probs.zarr --instances
[--instances-halo 8,32,32] [--min-volume-nm3 5e6]`` writes ``probs_instances.zarr`` by calling
:func:`blockwise_instances` on ``predict_volume``'s output with the task's method
(``Task.blockwise_instances_args``) and the same blocks, ``--backend`` and ``--scheduler``.

Resume: pass 1 leaves a counts file per finished block in ``.<dst>.work/``; a rerun with identical
settings segments only the missing blocks. The work folder is removed once ``dst`` is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ssl_em.data.normalize import default_normalization
from ssl_em.data.volume import as_volume, spec_path
from ssl_em.errors import ConfigError, VolumeError
from ssl_em.predict import instances as inst
from ssl_em.predict.blocks import BlockPlan, describe
from ssl_em.predict.dask_backend import dask_client
from ssl_em.predict.store import BlockId, array_folder, create_output_array
from ssl_em.utils.io import atomic_path, check_output, writer_attrs
from ssl_em.utils.shapes import Triple, to_triple

Method = Literal["components", "watershed", "mito", "affinities"]
INSTANCE_METHODS = ("components", "watershed", "mito", "affinities")
LOCAL_BITS = 32  # global fragment id = block key << 32 | local id
LOCAL_MASK = np.uint64(2**LOCAL_BITS - 1)


@dataclass
class StitchJob:
    """Geometry, method and scratch paths; picklable (the source reopens lazily in workers)."""

    src: Any  # (z, y, x) or (C, z, y, x) array-like
    plan: BlockPlan  # plan.overlap = 2 * halo per axis
    method: str
    threshold: float
    voxel_size: tuple[float, float, float]
    min_voxels: float
    kwargs: dict
    work: str  # scratch folder
    _frag: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_frag": None}

    @property
    def halo(self) -> Triple:
        return tuple(o // 2 for o in self.plan.overlap)  # type: ignore[return-value]

    @property
    def frag(self) -> Any:
        if self._frag is None:
            import zarr

            self._frag = zarr.open_array(os.path.join(self.work, "fragments.zarr"), mode="r+")
        return self._frag

    def key(self, idx: BlockId) -> int:
        return int(np.ravel_multi_index(idx, self.plan.grid))

    def ext(self, idx: BlockId) -> tuple[slice, ...]:
        """Core + halo on both sides, clipped to the volume (not shifted: the core stays centred)."""
        return tuple(slice(max(c.start - h, 0), min(c.stop + h, s))
                     for c, h, s in zip(self.plan.core(idx), self.halo, self.plan.shape))

    def zone(self, idx: BlockId) -> tuple[slice, ...]:
        """Core + the inner half of the halo (at least one voxel), clipped: where blocks are matched.
        Near the edge of its region a segmentation is least like the whole volume's (objects cut
        off, seeds missing), so the outer half of the halo only gives context."""
        return tuple(slice(max(c.start - (h + 1) // 2, 0), min(c.stop + (h + 1) // 2, s))
                     for c, h, s in zip(self.plan.core(idx), self.halo, self.plan.shape))

    def _path(self, idx: BlockId, what: str) -> str:
        return os.path.join(self.work, f"{'.'.join(map(str, idx))}.{what}")

    def segment_array(self, x: np.ndarray) -> np.ndarray:
        """Labels (z, y, x) of one region ``x`` (C, z, y, x) float32 with the in-memory method."""
        kw = {k: v for k, v in self.kwargs.items() if k not in ("channel", "mask_channel", "min_overlap")}
        ch, mc = self.kwargs.get("channel", 0), self.kwargs.get("mask_channel")
        if self.method == "components":
            return inst.connected_components(x[ch] > self.threshold, kw.get("connectivity", 26))
        if self.method == "watershed":
            return inst.seeded_watershed(x[ch], None if mc is None else x[mc] > self.threshold, **kw)
        if self.method == "mito":
            return inst.mito_instances(x[0], x[1] if x.shape[0] > 1 else None, self.voxel_size,
                                       threshold=self.threshold, **kw)
        return inst.affinity_agglomeration(x, threshold=self.threshold, voxel_size=self.voxel_size, **kw)

    # --- pass 1 ------------------------------------------------------------------------------
    def segment(self, idx: BlockId) -> None:
        """Segment block + halo; write core ids; save halo ids and core counts (the done marker)."""
        ext, core = self.ext(idx), self.plan.core(idx)
        raw = np.asarray(self.src[ext] if len(self.src.shape) == 3 else self.src[(slice(None), *ext)])
        x = default_normalization(raw)  # uint8 probabilities (predict_volume's out_dtype) -> [0, 1]
        labels = np.asarray(self.segment_array(x[None] if x.ndim == 3 else x))
        inner = tuple(slice(c.start - e.start, c.stop - e.start) for c, e in zip(core, ext))
        # renumber: ids present in the core -> 1..n (written), ids only in the halo -> n+1..m
        in_core = np.unique(labels[inner])
        in_core = in_core[in_core != 0]
        table = np.zeros(int(labels.max()) + 1, np.uint64)
        table[in_core] = np.arange(1, in_core.size + 1, dtype=np.uint64)
        rest = np.setdiff1d(np.unique(labels), np.concatenate([[0], in_core]))
        table[rest] = np.arange(in_core.size + 1, in_core.size + 1 + rest.size, dtype=np.uint64)
        local = table[labels]
        core_ids = local[inner].copy()  # a copy: the core is zeroed in ``local`` below
        self.frag[core] = np.where(core_ids > 0, core_ids | np.uint64(self.key(idx) << LOCAL_BITS), 0)
        keep = np.zeros(local.shape, bool)
        keep[tuple(slice(z.start - e.start, z.stop - e.start) for z, e in zip(self.zone(idx), ext))] = True
        local[inner] = 0
        local[~keep] = 0  # pass 2 needs only the halo's matching zone
        with atomic_path(self._path(idx, "halo.npz")) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, halo=local.astype(np.uint32))
        counts = np.bincount(core_ids.ravel(), minlength=in_core.size + 1).astype(np.int64)
        with atomic_path(self._path(idx, "counts.npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, counts)

    def counts(self, idx: BlockId) -> np.ndarray:
        """(n + 1,) int64 core voxels per local id of block ``idx``."""
        return np.load(self._path(idx, "counts.npy"))

    # --- pass 2 ------------------------------------------------------------------------------
    def match(self, idx: BlockId) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """``(kept, pairs (k, 2) uint64, nodes (m,) uint64, node_counts (m,) int64)`` of block ``idx``.

        ``kept``: local ids whose core count reaches ``min_voxels``; pairs join a halo id of this
        block with the neighbour id written under it; nodes are the ids in pairs with core counts.
        """
        counts = self.counts(idx)
        kept = int(np.count_nonzero(counts[1:] >= self.min_voxels))
        halo = np.load(self._path(idx, "halo.npz"))["halo"].astype(np.uint64)
        halo[halo != 0] |= np.uint64(self.key(idx) << LOCAL_BITS)
        ext, zone = self.ext(idx), self.zone(idx)
        frag = np.asarray(self.frag[zone])
        found = [np.zeros((0, 2), np.uint64)]
        for step in itertools.product((-1, 0, 1), repeat=3):  # the 26 neighbours, one at a time so
            nb = tuple(i + d for i, d in zip(idx, step))  # overlaps are measured per neighbour block
            if step == (0, 0, 0) or not all(0 <= n < g for n, g in zip(nb, self.plan.grid)):
                continue
            box = [slice(max(c.start, z.start), min(c.stop, z.stop)) for c, z in zip(self.plan.core(nb), zone)]
            a = halo[tuple(slice(s.start - e.start, s.stop - e.start) for s, e in zip(box, ext))].ravel()
            b = frag[tuple(slice(s.start - z.start, s.stop - z.start) for s, z in zip(box, zone))].ravel()
            if not a.any() or not b.any():
                continue
            if self.method == "components":  # any touching foreground is one component
                fg = (a != 0) & (b != 0)
                found.append(np.unique(np.stack([a[fg], b[fg]], 1), axis=0))
            else:
                found.append(_mutual_overlaps(a, b, self.kwargs.get("min_overlap", 0.5)))
        pairs = np.concatenate(found)
        nodes = np.unique(pairs)
        node_counts = np.zeros(nodes.size, np.int64)
        blocks = (nodes >> np.uint64(LOCAL_BITS)).astype(np.int64)
        for k in np.unique(blocks):  # read the (small) counts file of each block involved
            c = self.counts(tuple(int(v) for v in np.unravel_index(k, self.plan.grid)))  # type: ignore[arg-type]
            loc = (nodes[blocks == k] & LOCAL_MASK).astype(np.int64)
            node_counts[blocks == k] = np.where(loc < c.size, c[np.minimum(loc, c.size - 1)], 0)
        return kept, pairs, nodes, node_counts

    # --- pass 3 ------------------------------------------------------------------------------
    def relabel(self, idx: BlockId, out_path: str, offset: int, face_local: np.ndarray,
                face_final: np.ndarray) -> None:
        """Write block ``idx`` of the final array: kept ids not on a face get ``offset + 1..``, face
        ids their global id (0 when their object is too small)."""
        import zarr

        counts = self.counts(idx)
        table = np.zeros(counts.size, np.uint64)
        own = counts >= self.min_voxels
        own[0] = False
        written = face_local < counts.size  # halo-only ids are never written
        face_local, face_final = face_local[written], face_final[written]
        own[face_local] = False
        table[own] = offset + np.arange(1, int(own.sum()) + 1, dtype=np.uint64)
        table[face_local] = face_final
        core = self.plan.core(idx)
        local = (np.asarray(self.frag[core]) & LOCAL_MASK).astype(np.int64)
        out = zarr.open_array(out_path, mode="r+")
        out[core] = table[local].astype(out.dtype)


def _mutual_overlaps(a: np.ndarray, b: np.ndarray, min_overlap: float) -> np.ndarray:
    """(k, 2) uint64 pairs of non-zero ids (in a, in b) whose overlap covers ``min_overlap`` of *both*
    ids' voxels in ``a``/``b`` (same shape). Both, not the smaller: an object that only grazes the
    halo would otherwise join whatever neighbour owns those few voxels."""
    from ssl_em.metrics.contingency import contingency_table

    t = contingency_table(a, b)  # background on either side counts in sizes: it is disagreement
    ok = t.counts >= min_overlap * np.maximum(t.sizes_a[t.rows], t.sizes_b[t.cols])
    ok &= (t.labels_a[t.rows] != 0) & (t.labels_b[t.cols] != 0)
    return np.stack([t.labels_a[t.rows[ok]], t.labels_b[t.cols[ok]]], 1).astype(np.uint64)


def _global_ids(matched: list, n_blocks: int, min_voxels: float) -> tuple[np.ndarray, int, list]:
    """Union-find over the face pairs of all blocks, then consecutive final ids.

    ``matched``: pass-2 results per block (in block-key order). Ids that touch no halo keep a
    block-local rank after a per-block prefix sum; objects joined across blocks come after all of
    them, sizes summed over blocks. Returns ``(offset per block, n objects, [(local ids, final
    ids) of the block's face ids] per block)``; only face ids are held here, never the volume.
    """
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    pairs = np.concatenate([m[1] for m in matched])
    nodes, first = np.unique(np.concatenate([m[2] for m in matched]), return_index=True)
    counts = np.concatenate([m[3] for m in matched])[first]  # core voxels (0: an id only in a halo)
    ij = np.searchsorted(nodes, pairs)
    graph = coo_array((np.ones(len(ij)), (ij[:, 0], ij[:, 1])), shape=(nodes.size, nodes.size))
    n_obj, comp = connected_components(graph, directed=False)
    keep = np.bincount(comp, weights=counts, minlength=n_obj) >= max(min_voxels, 1)
    block = (nodes >> np.uint64(LOCAL_BITS)).astype(np.int64)
    # a block's ``kept`` counted its large face ids too; they take the joined objects' ids instead
    own = np.array([m[0] for m in matched], np.int64) - np.bincount(
        block[(counts > 0) & (counts >= min_voxels)], minlength=n_blocks)
    n_own = int(own.sum())
    final = np.zeros(n_obj, np.uint64)
    final[keep] = n_own + np.arange(1, int(keep.sum()) + 1, dtype=np.uint64)
    final = final[comp]
    local = (nodes & LOCAL_MASK).astype(np.int64)
    order = np.argsort(block, kind="stable")
    bounds = np.searchsorted(block[order], np.arange(n_blocks + 1))
    faces = [(local[order[bounds[k]:bounds[k + 1]]], final[order[bounds[k]:bounds[k + 1]]]) for k in range(n_blocks)]
    return np.concatenate([[0], np.cumsum(own)[:-1]]).astype(np.int64), n_own + int(keep.sum()), faces


def _run(fn: Callable, job: StitchJob, items: Sequence[tuple], backend: str, client: Any, desc: str,
         progress: bool) -> list:
    """``[fn(job, *item) for item in items]`` here or on dask workers, in order, with a progress bar.

    On dask ``job`` is the future of the job scattered once to every worker."""
    from tqdm.auto import tqdm

    with tqdm(total=len(items), disable=not progress, unit="block", desc=desc) as bar:
        if backend == "local":
            out = []
            for item in items:
                out.append(fn(job, *item))
                bar.update()
            return out
        from distributed import as_completed

        futures = [client.submit(fn, job, *item, pure=False) for item in items]
        for _ in as_completed(futures):
            bar.update()
        return client.gather(futures)  # re-raises a task's error here


def _segment_task(job: StitchJob, idx: BlockId) -> None:
    job.segment(idx)


def _match_task(job: StitchJob, idx: BlockId):
    return job.match(idx)


def _relabel_task(job: StitchJob, idx: BlockId, out_path: str, offset: int, loc: np.ndarray, fin: np.ndarray) -> None:
    job.relabel(idx, out_path, offset, loc, fin)


def blockwise_instances(
    src: Any,
    dst: str | os.PathLike,
    method: Method = "components",
    block_shape: int | Sequence[int] = (64, 256, 256),
    halo: int | Sequence[int] = (8, 32, 32),
    threshold: float = 0.5,
    *,
    voxel_size: Sequence[float] | None = None,
    min_volume_nm3: float = 0.0,
    backend: Literal["local", "dask"] = "local",
    scheduler: Any = None,
    overwrite: bool = False,
    fill_missing: bool = False,
    progress: bool = True,
    **method_kwargs: Any,
) -> Any:
    """Instances of a probability map of any size, segmented per block and stitched to global ids.

    Args:
        src: volume spec or array-like, (z, y, x) or (C, z, y, x) probabilities (e.g. the output of
            ``predict_volume``; integer maps are divided by their dtype's maximum, so uint8 0..255
            reads as [0, 1]), read lazily one block + halo at a time.
        dst: output folder: a zarr v3 array (z, y, x) of uint32 ids 1..n (uint64 past 2**32 - 1),
            0 = background, chunks ``block_shape``, attribute ``resolution`` = voxel size (nm);
            ``*.ome.zarr`` writes an OME-Zarr 0.5 image group holding that array as ``0``.
        method: ``"components"`` (channel ``channel`` > threshold; ``connectivity`` 6/18/26; exact,
            halo ignored), ``"watershed"`` (:func:`~ssl_em.predict.instances.seeded_watershed` of channel
            ``channel``, masked by channel ``mask_channel`` > threshold if given), ``"mito"``
            (:func:`~ssl_em.predict.instances.mito_instances`: channel 0 foreground, 1 boundary if
            present) or ``"affinities"`` (:func:`~ssl_em.predict.instances.affinity_agglomeration`;
            pass ``offsets``). Other ``method_kwargs`` go to that function; ``min_overlap``
            (default 0.5) is the stitching overlap fraction of the halo methods.
        block_shape: block (z, y, x) voxels per task = the output's chunk shape.
        halo: context (z, y, x) on each side of a block for the halo methods; see the module
            docstring for when the result is exact.
        threshold: foreground threshold (components, mito, watershed mask) or merge threshold
            (affinities).
        voxel_size: (z, y, x) nm; default the source's. Needed for ``min_volume_nm3`` and mito.
        min_volume_nm3: objects smaller than this (summed over all blocks) become 0.
        backend: ``"local"`` or ``"dask"`` (``scheduler``: None -> LocalCluster of 2 processes,
            an address or a ``distributed.Client``).
        overwrite: replace an existing ``dst`` that ssl-em wrote (else ConfigError); an output that is,
            holds or sits inside ``src``, or a folder ssl-em did not write, is never replaced.
        fill_missing: read zarr chunks absent from a ``src`` that ssl-em did not write as the fill value.

    Returns:
        The output zarr array (opened read-only); ``attrs["num_instances"]`` = the number of ids.
    """
    import zarr

    if method not in INSTANCE_METHODS:
        raise ConfigError(f"method={method!r} is not one of {INSTANCE_METHODS}")
    if backend not in ("local", "dask"):
        raise ConfigError(f"backend={backend!r} is not one of 'local', 'dask'")
    if method == "affinities" and "offsets" not in method_kwargs:
        raise ConfigError("method='affinities' needs offsets=[(dz, dy, dx), ...] (one per channel)")
    source = as_volume(src, fill_missing=fill_missing)
    if len(source.shape) not in (3, 4):
        raise VolumeError(f"input {describe(src)} has shape {tuple(source.shape)}; "
                          "expected (z, y, x) or (c, z, y, x)")
    vs_known = voxel_size is not None or getattr(source, "voxel_size_known", False)
    vs = tuple(float(v) for v in (voxel_size or getattr(source, "voxel_size", None) or (1.0, 1.0, 1.0)))
    if min_volume_nm3 > 0 and not vs_known:
        raise ConfigError(f"min_volume_nm3={min_volume_nm3} needs a voxel size: {describe(src)} has none, "
                          "pass voxel_size=(z, y, x) nm")
    shape = tuple(int(s) for s in source.shape[-3:])
    block = to_triple(block_shape, "block_shape")
    h = (1, 1, 1) if method == "components" else to_triple(halo, "halo")
    region = tuple(b + 2 * v for b, v in zip(block, h))
    plan = BlockPlan(shape, block, tuple(2 * v for v in h), region)  # type: ignore[arg-type]
    dst = Path(dst)
    check_output(dst, [p for p in [spec_path(src)] if p is not None], overwrite=overwrite,
                 writer="ssl_em.predict.stitch")

    min_voxels = min_volume_nm3 / float(np.prod(vs))
    params = {"src": describe(src), "shape": shape, "plan": [block, h], "method": method, "threshold": threshold,
              "voxel_size": vs, "kwargs": method_kwargs}
    digest = hashlib.blake2b(json.dumps(params, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()
    work = dst.parent / f".{dst.name}.work"
    stamp = work / "params.json"
    if work.exists() and (not stamp.exists() or json.loads(stamp.read_text()).get("hash") != digest):
        shutil.rmtree(work)  # a different run's scratch: start over
    if not work.exists():
        work.mkdir(parents=True)
        zarr.create_array(str(work / "fragments.zarr"), shape=shape, chunks=block, dtype="uint64", fill_value=0)
        stamp.write_text(json.dumps({"hash": digest, "params": params}, default=str))
    job = StitchJob(source, plan, method, float(threshold), vs, min_voxels,  # type: ignore[arg-type]
                    dict(method_kwargs), str(work))

    with contextlib.ExitStack() as stack:
        client = stack.enter_context(dask_client(scheduler)) if backend == "dask" else None
        # ship the job (and an in-memory source) once; keep it until the end
        job_run = client.scatter(job, broadcast=True, hash=False) if client is not None else job
        blocks = list(plan.blocks())
        todo = [(idx,) for idx in blocks if not os.path.exists(job._path(idx, "counts.npy"))]
        _run(_segment_task, job_run, todo, backend, client, f"segment {dst.name}", progress)
        matched = _run(_match_task, job_run, [(idx,) for idx in blocks], backend, client, f"match {dst.name}",
                       progress)

        offsets, n_total, faces = _global_ids(matched, len(blocks), min_voxels)
        with atomic_path(dst, is_dir=True) as tmp:
            attrs = {"resolution": list(vs), **writer_attrs("ssl_em.predict.stitch", sparse=True)}
            dtype = "uint32" if n_total < 2**32 else "uint64"
            arr = create_output_array(tmp, dst.name, shape, block, dtype, attrs, vs)
            items = [(idx, str(arr), int(off), *face) for idx, off, face in zip(blocks, offsets, faces)]
            _run(_relabel_task, job_run, items, backend, client, f"relabel {dst.name}", progress)
            zarr.open_array(str(arr), mode="r+").attrs["num_instances"] = int(n_total)
    shutil.rmtree(work, ignore_errors=True)
    return zarr.open_array(str(array_folder(dst)), mode="r")
