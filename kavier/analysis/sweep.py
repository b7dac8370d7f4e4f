"""Run the points of a parameter sweep in parallel: local processes, or a Dask cluster.

Every point is a plain dict handed to a module-level function, so the same code runs in local
worker processes (Dask's multiprocessing scheduler, the default) or on a Dask distributed
cluster (``scheduler="tcp://host:8786"``); the functions are deterministic, so the results are
identical either way (a test checks it).
"""

from __future__ import annotations

from collections.abc import Callable

from archive.errors import InputError


def run_points(fn: Callable[[dict], dict], points: list[dict], scheduler: str | None = None,
               workers: int | None = None) -> list[dict]:
    """``[fn(p) for p in points]``, evaluated in parallel, in the order of ``points``.

    Parameters
    ----------
    fn : callable
        A module-level (picklable) function of one point.
    points : list of dict
    scheduler : str or None
        Address of a Dask scheduler; None runs local worker processes.
    workers : int or None
        Local worker processes (default: one per CPU).

    Raises
    ------
    InputError
        When the scheduler cannot be reached.
    """
    if scheduler:
        from dask.distributed import Client

        try:
            client = Client(scheduler, timeout="10s")
        except OSError as exc:
            raise InputError(f"cannot reach the Dask scheduler: {exc}",
                             field="scheduler") from None
        with client:
            return client.gather(client.map(fn, points, pure=False))
    import dask

    tasks = [dask.delayed(fn)(p) for p in points]
    return list(dask.compute(*tasks, scheduler="processes", num_workers=workers))
