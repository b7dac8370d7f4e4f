"""OpenDC workload export: ``opendc/tasks.parquet`` and ``opendc/fragments.parquet``.

The schemas are OpenDC's workload format as its reader defines it (``opendc-trace-api``,
``formats/workload/parquet/TaskSchemas.kt`` ``TASK_SCHEMA_V4`` and ``FragmentSchemas.kt``
``FRAGMENT_SCHEMA_v2``, read at atlarge-research/opendc commit 82a0d6c): tasks with an INT32
id, a submission time as a UTC timestamp in milliseconds, a duration in milliseconds, CPU and
GPU capacity in MHz and memory in KB; per task the fragments it runs through, each a duration
in milliseconds with CPU and GPU demand in MHz. Only the required columns and the GPU ones are
written; ``num_fragments`` (optional in V4) is left out on purpose: OpenDC's
``EfficientWorkloadLoader`` needs it *and* fragments grouped by task, while ours interleave the
replicas in time order, which its ``ComputeWorkloadLoader`` (grouping by id) reads and the
efficient one refuses with its own error.

How a simulated run maps onto that: **one task per replica** (one GPU serving the workload),
submitted at the start instant (``--start-time``), lasting the whole run; its fragments are
the replica's run-length timeline — every interval and idle gap — with ``gpu_usage`` =
utilization × the GPU's boost clock (the same utilization the simulator's power model sees).
``cpu_count = 1`` at ``cpu_capacity`` MHz with ``cpu_usage`` 0 (Kavier does not model host CPU
load). ``mem_capacity``: weights plus the replica's KV pool, in KB of 1,000 bytes, rounded up
(OpenDC's ``conv/TaskColumns.kt`` documents KB and its workload loaders divide by 1,000 to
get MB). Milliseconds are rounded at absolute boundaries, never truncated,
so a task's duration equals the sum of its fragments and rounding never accumulates.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa

from archive.arrow import from_numpy

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
"""OpenDC ``tasks.parquet`` (the required and GPU columns of ``TASK_SCHEMA_V4``)."""

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
"""Capacity of the host core reserved per task, MHz (placement only; no CPU load)."""


def opendc_fragments(rows: dict, gpu_mhz: float) -> pa.RecordBatch:
    """OpenDC fragments of run-length fragment rows (``replica``, ``time_s``,
    ``duration_s``, ``gpu_utilization``); rows that round to 0 ms are dropped."""
    t0, d = rows["time_s"], rows["duration_s"]
    ms = (np.rint((t0 + d) * 1000.0) - np.rint(t0 * 1000.0)).astype(np.int64)
    keep = ms > 0
    return pa.RecordBatch.from_arrays([
        from_numpy(rows["replica"][keep].astype(np.int32)), from_numpy(ms[keep]),
        from_numpy(np.zeros(int(keep.sum()))),
        from_numpy(np.ascontiguousarray(rows["gpu_utilization"][keep] * gpu_mhz)),
    ], schema=FRAGMENTS_SCHEMA)


def opendc_tasks(replicas: int, end_s: float, gpu_mhz: float, memory_bytes: float,
                 start: datetime = DEFAULT_START, cpu_mhz: float = HOST_CPU_MHZ,
                 gpus: int = 1) -> pa.RecordBatch:
    """One task per replica from time 0 to ``end_s``; ``memory_bytes`` and ``gpus`` (the
    tensor-parallel size) per replica."""
    epoch_ms = (start - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    n = replicas
    return pa.RecordBatch.from_arrays([
        from_numpy(np.arange(n, dtype=np.int32)),
        from_numpy(np.full(n, epoch_ms, np.int64), pa.timestamp("ms", tz="UTC")),
        from_numpy(np.full(n, int(np.rint(end_s * 1000.0)), np.int64)),
        from_numpy(np.ones(n, np.int32)), from_numpy(np.full(n, cpu_mhz)),
        from_numpy(np.full(n, int(np.ceil(memory_bytes / 1000.0)), np.int64)),
        from_numpy(np.full(n, gpus, np.int32)), from_numpy(np.full(n, float(gpu_mhz))),
    ], schema=TASKS_SCHEMA)
