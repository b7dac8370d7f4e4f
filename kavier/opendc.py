"""OpenDC workload export: ``opendc/tasks.parquet`` and ``opendc/fragments.parquet``.

The schemas are OpenDC's current workload format (``opendc-trace``, ``TaskSchemas.kt`` v4 and
``FragmentSchemas.kt`` v2): a task per request, with its submission time as a UTC timestamp in
milliseconds, its duration in milliseconds, CPU and GPU capacity in MHz and memory in KiB; and
per task the fragments it runs through, each a duration in milliseconds with the CPU and GPU
demand in MHz.

How a request maps onto that:

* ``submission_time``: the start instant (``--start-time``, default 2022-01-01 UTC, inside
  the bundled carbon traces) plus the arrival (or, back to back, the start) in ms.
* ``gpu_count = 1``, ``gpu_capacity`` = the GPU's boost clock; ``gpu_usage`` = utilization ×
  boost clock.
* ``cpu_count = 1`` at ``cpu_capacity`` MHz (one host core drives the GPU; Kavier does not
  model host CPU load, so ``cpu_usage`` is 0 and OpenDC attributes no CPU work).
* ``mem_capacity``: the GPU memory the request occupies, weights plus its peak KV cache, KiB.
* Fragments are the request's run-length utilization phases (Listing 4.3's warm-up, inference,
  cool-down). Utilization is piecewise constant, so this loses nothing against sampling at any
  export rate and keeps the files small.

Milliseconds are rounded at absolute phase boundaries, never truncated, so each task's duration
equals the sum of its fragments and the rounding error never accumulates. Requests with no GPU
work (hits of the ``full`` prefix-cache policy) have no task.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa

from archive.arrow import column, from_numpy
from kavier.fragments import phase_rows, phase_utilization

TASKS_SCHEMA = pa.schema([
    pa.field("id", pa.int32(), nullable=False),
    pa.field("submission_time", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("duration", pa.int64(), nullable=False),
    pa.field("cpu_count", pa.int32(), nullable=False),
    pa.field("cpu_capacity", pa.float64(), nullable=False),
    pa.field("mem_capacity", pa.int64(), nullable=False),
    pa.field("gpu_count", pa.int32()),
    pa.field("gpu_capacity", pa.float64()),
])
"""OpenDC ``tasks.parquet`` (required columns of TaskSchemas v4; the optional ``name``,
``parents``, ``children``, ``deferrable``, ``deadline``, ``num_fragments``, ``host`` are left
out)."""

FRAGMENTS_SCHEMA = pa.schema([
    pa.field("id", pa.int32(), nullable=False),
    pa.field("duration", pa.int64(), nullable=False),
    pa.field("cpu_usage", pa.float64(), nullable=False),
    pa.field("gpu_usage", pa.float64()),
])
"""OpenDC ``fragments.parquet`` (FragmentSchemas v2)."""

DEFAULT_START = datetime(2022, 1, 1, tzinfo=UTC)
"""Wall-clock instant of simulated time 0 unless told otherwise."""
HOST_CPU_MHZ = 2400.0
"""Default capacity of the host core reserved per task, MHz (placement only; no CPU load)."""
_INT32_MAX = 2**31 - 1


def opendc_batches(requests: pa.Table, gpu_mhz: float, weight_bytes: float,
                   utilization_cap: float = 1.0, start: datetime = DEFAULT_START,
                   cpu_mhz: float = HOST_CPU_MHZ) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    """Tasks and fragments of one chunk of simulated requests.

    Parameters
    ----------
    requests : pyarrow.Table
        Engine output (``id``, ``arrival_s``, ``start_s``, ``prefill_s``, ``decode_s``,
        ``kv_cache_peak_bytes``).
    gpu_mhz : float
        The GPU's boost clock, MHz.
    weight_bytes : float
        Model weights, bytes (part of each task's memory).
    utilization_cap : float
        GPU utilization while inferring (Listing 4.3).
    start : datetime
        Wall-clock instant of simulated time 0 (timezone-aware).

    Returns
    -------
    tasks, fragments : RecordBatch
        Of :data:`TASKS_SCHEMA` and :data:`FRAGMENTS_SCHEMA`.

    Raises
    ------
    ValueError
        When a request id does not fit OpenDC's int32 task ids.
    """
    ids = column(requests, "id", np.int64)
    if ids.size and ids.max() > _INT32_MAX:
        raise ValueError("OpenDC task ids are int32: the trace has more than 2^31 requests")
    begin = column(requests, "start_s", np.float64)
    total = column(requests, "prefill_s", np.float64) + column(requests, "decode_s", np.float64)
    owner, phase, offset, length = phase_rows(total)
    t0 = begin[owner] + offset
    durations = (np.rint((t0 + length) * 1000.0) - np.rint(t0 * 1000.0)).astype(np.int64)
    keep = durations > 0
    owner, durations = owner[keep], durations[keep]
    usage = phase_utilization(phase[keep], utilization_cap)
    task_ms = np.bincount(owner, weights=durations, minlength=ids.size).astype(np.int64)
    has_work = task_ms > 0
    arrival = column(requests, "arrival_s", np.float64)
    submitted = np.where(np.isnan(arrival), begin, arrival)
    epoch_ms = (start - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    mem_kib = (weight_bytes + column(requests, "kv_cache_peak_bytes", np.float64)) / 1024.0
    n = int(has_work.sum())
    tasks = pa.RecordBatch.from_arrays([
        from_numpy(ids[has_work].astype(np.int32)),
        from_numpy(epoch_ms + np.rint(submitted[has_work] * 1000.0).astype(np.int64),
                   pa.timestamp("ms", tz="UTC")),
        from_numpy(task_ms[has_work]),
        from_numpy(np.ones(n, np.int32)),
        from_numpy(np.full(n, cpu_mhz)),
        from_numpy(np.ceil(mem_kib[has_work]).astype(np.int64)),
        from_numpy(np.ones(n, np.int32)),
        from_numpy(np.full(n, float(gpu_mhz))),
    ], schema=TASKS_SCHEMA)
    fragments = pa.RecordBatch.from_arrays([
        from_numpy(ids[owner].astype(np.int32)), from_numpy(durations),
        from_numpy(np.zeros(owner.size)), from_numpy(usage * gpu_mhz),
    ], schema=FRAGMENTS_SCHEMA)
    return tasks, fragments

