"""Run the block tasks of :func:`predict_volume` on a dask.distributed cluster.

Each task reads its input region, predicts, writes its own output chunk to the shared zarr store
and drops a marker; no two tasks touch the same chunk, so no locks are needed. The model is
shipped once per worker (``client.scatter(..., broadcast=True)``); TorchScript modules, which do
not pickle, travel as their serialised bytes.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ssl_em.predict.blocks import BlockJob
from ssl_em.predict.store import BlockId
from ssl_em.utils.precision import resolve_device


class ModelPayload:
    """A picklable model holder; the model is rebuilt and moved to its device once per process."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._ready: Any = None

    def __reduce__(self):
        import torch

        if isinstance(self.model, torch.jit.ScriptModule):
            buf = io.BytesIO()
            with warnings.catch_warnings():  # TorchScript is deprecated in torch >= 2.9 but works
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.save(self.model, buf)
            return (_from_script_bytes, (buf.getvalue(),))
        return (ModelPayload, (self.model,))

    def get(self, device: str) -> Any:
        if self._ready is None:
            model = self.model.to(resolve_device(device)) if hasattr(self.model, "to") else self.model
            self._ready = model.eval() if hasattr(model, "eval") else model
        return self._ready


def _from_script_bytes(data: bytes) -> ModelPayload:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return ModelPayload(torch.jit.load(io.BytesIO(data), map_location="cpu"))


def _task(job: BlockJob, payload: ModelPayload, ids: Sequence[BlockId]) -> list[BlockId]:
    import torch

    try:  # one torch thread per dask thread: workers x threads already fill the cores
        from distributed import get_worker

        torch.set_num_threads(max(1, int(get_worker().state.nthreads)))
    except (ImportError, ValueError, AttributeError):
        pass
    return job.run(payload.get(job.device), ids)


def run_dask(job: BlockJob, model: Any, groups: Sequence[list[BlockId]], scheduler: Any,
             on_done: Callable[[int], Any], max_in_flight: int | None = None) -> None:
    """Submit one task per group of blocks; at most ``max_in_flight`` (default 2x threads) at once.

    ``scheduler``: as :func:`dask_client`.
    """
    if not groups:  # everything done already: do not start a cluster
        return
    from distributed import as_completed

    with dask_client(scheduler) as client:
        model_f = client.scatter(ModelPayload(model.cpu() if hasattr(model, "cpu") else model), broadcast=True)
        job_f = client.scatter(job, broadcast=True)  # the source (e.g. a numpy array) travels once
        if max_in_flight is None:
            max_in_flight = 2 * max(1, sum(client.nthreads().values()))
        pending = iter(groups)
        ac = as_completed()
        for ids in pending:
            ac.add(client.submit(_task, job_f, model_f, ids, pure=False))
            if ac.count() >= max_in_flight:
                break
        for fut in ac:
            on_done(len(fut.result()))  # re-raises a task's error here
            fut.release()
            nxt = next(pending, None)
            if nxt is not None:
                ac.add(client.submit(_task, job_f, model_f, nxt, pure=False))


@contextlib.contextmanager
def dask_client(scheduler: Any) -> Iterator[Any]:
    """The ``distributed.Client`` for ``scheduler``: None -> a LocalCluster of 2 worker processes with one
    thread each (closed afterwards); an address string -> a Client connected to it (closed afterwards);
    an existing ``Client`` -> itself (left open)."""
    from distributed import Client, LocalCluster

    owned: list[Any] = []
    if scheduler is None:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        owned = [Client(cluster), cluster]
        client = owned[0]
    elif isinstance(scheduler, str):
        client = Client(scheduler)
        owned = [client]
    else:
        client = scheduler
    try:
        yield client
    finally:
        for obj in owned:
            obj.close()
