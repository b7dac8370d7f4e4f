"""Stream a simulation into its output folder: requests, steps, fragments, OpenDC workload.

The engine hands on the request record and the GPU timeline chunk by chunk; each chunk is
written at once (``requests.parquet``, ``steps.parquet``, ``fragments.parquet``,
``opendc/``), so memory stays flat however long the trace is. Files are written as
``.partial`` and renamed when complete (:mod:`kavier.export.output`); the caller writes
``summary.json`` last.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa

from archive.arrow import column, to_numpy
from archive.errors import InputError
from kavier.export.fragments import (
    FRAGMENT_PARQUET_OPTIONS,
    FragmentBuilder,
    fragment_schema,
    to_batch,
)
from kavier.export.opendc import (
    DEFAULT_START,
    FRAGMENTS_SCHEMA,
    TASKS_SCHEMA,
    opendc_fragments,
    opendc_tasks,
)
from kavier.export.output import RunWriter
from kavier.sim.load import OfferedLoad

ROW_LIMIT = 100_000_000
"""Most rows a run writes into one fragment file (``fragments.parquet``,
``opendc/fragments.parquet``) unless ``--force``: about 2.5 GB on disk and minutes of writing.
A finer ``--export-rate`` over a long trace can ask for billions of rows."""

ESTIMATE_CHUNK = 1_000_000
"""Requests costed at once by the row-limit estimate."""

OUTPUT_FILES = ("requests.parquet", "steps.parquet", "fragments.parquet",
                "opendc/tasks.parquet", "opendc/fragments.parquet")
"""Files a run may write (besides ``summary.json``); a new run removes them first, so none is
left over from an earlier run."""
_PLAIN = {"use_dictionary": False}


@dataclass(frozen=True)
class ExportOptions:
    """What a run writes.

    Attributes
    ----------
    export_rate_s : float
        Row interval of ``fragments.parquet``, s; 0 for run-length rows.
    fragments, opendc, steps : bool
        Write ``fragments.parquet``, the OpenDC workload, ``steps.parquet``.
    start : datetime
        Wall-clock instant of simulated time 0 (timezone-aware), for OpenDC's submission
        times.
    """

    export_rate_s: float = 0.1
    fragments: bool = True
    opendc: bool = True
    steps: bool = False
    start: datetime = DEFAULT_START
    row_limit: int | None = ROW_LIMIT


def too_many_rows(what: str, rows: float, options: ExportOptions) -> InputError:
    """The one-line error for a fragment file past ``options.row_limit``."""
    return InputError(f"{what} would hold {rows:,.0f} rows or more, past the limit of "
                      f"{options.row_limit:,}; choose a coarser --export-rate (now "
                      f"{options.export_rate_s:g} s), --no-fragments, or --force",
                      field="export-rate")


def check_fragment_rows(table: pa.Table, timing, config, options: ExportOptions) -> int:
    """Refuse, before the run, an export whose ``fragments.parquet`` would pass the row limit.

    The estimate is a lower bound: ``replicas × timeline / export_rate`` with the timeline at
    least the last arrival and at least the work's GPU time over the replicas
    (:class:`~kavier.sim.load.OfferedLoad` at the best batching), so the guard never refuses a
    run that would stay under the limit; :class:`RunOutput` stops one that passes it anyway.

    Returns
    -------
    int
        The estimated rows (0 with run-length rows or no fragments).

    Raises
    ------
    InputError
        When the estimate passes ``options.row_limit``.
    """
    if not options.fragments or options.export_rate_s == 0:
        return 0
    load = OfferedLoad(timing, config.max_num_seqs, 2**62, config.replicas)   # no KV bound
    n_in = column(table, "n_input_tokens", np.int64)
    n_out = np.maximum(column(table, "n_output_tokens", np.int64), 1)
    for lo in range(0, n_in.size, ESTIMATE_CHUNK):   # bounded temporaries on long traces
        part = slice(lo, lo + ESTIMATE_CHUNK)
        load.add(n_in[part], np.zeros_like(n_in[part]), n_out[part])
    last = (float(np.max(column(table, "arrival_s", np.float64)))
            if "arrival_s" in table.column_names and table.num_rows and not config.back_to_back
            else 0.0)
    timeline = max(last, load.total_demand_s() / config.replicas)
    rows = config.replicas * timeline / options.export_rate_s
    if options.row_limit is not None and rows > options.row_limit:
        raise too_many_rows("fragments.parquet", rows, options)
    return int(rows)


def replica_memory_bytes(timing, summary: dict) -> float:
    """GPU memory a replica (with pipeline parallelism: a stage) holds, bytes: its weights
    (all ranks; with expert parallelism the shared ones and its GPUs' experts) plus its KV
    pool (``kv_pool_blocks × block_size`` tokens at eq. 4.1's bytes per token; none without
    the KV cache), times the stage's share of the layers. What OpenDC's ``mem_capacity``
    carries."""
    kv = timing.llm.kv_bytes_per_token if timing.kv_cache else 0.0
    share = getattr(timing, "stage_share", 1.0)
    weights = float(timing.llm.weight_bytes)
    if timing.expert_parallel_size > 1:      # the replica holds its share of the experts
        tp = timing.tensor_parallel_size
        weights = timing.llm.resident_weight_bytes(tp, timing.expert_parallel_size) * tp
    return (weights + summary["kv_pool_blocks"] * summary["block_size"] * kv) * share


class RunOutput:
    """The engine's sinks (:func:`kavier.sim.simulation.simulate`'s ``on_requests`` and
    ``on_steps``), writing into ``out``; use as a context manager, call :meth:`finish` with
    the run's end.

    Raises
    ------
    InputError
        When OpenDC export is asked for a GPU without a boost clock in the library.
    """

    def __init__(self, out: RunWriter, options: ExportOptions, sustainability, gpu,
                 replicas: int) -> None:
        if options.opendc and not gpu.boost_clock_mhz:
            raise InputError(f"GPU {gpu.name} has no boost_clock_mhz in the GPU library, which "
                             "OpenDC's capacity needs; add it or pass --no-opendc",
                             field="opendc")
        self.out, self.options, self.sus = out, options, sustainability
        self.gpu_mhz, self.replicas = gpu.boost_clock_mhz, replicas
        for name in OUTPUT_FILES:
            (out.folder / name).unlink(missing_ok=True)
        self.rows = {}
        self._stack = ExitStack()
        self._writers = {}
        self._threads = {}
        self._fragments = ([FragmentBuilder(r, options.export_rate_s, sustainability)
                            for r in range(replicas)] if options.fragments else None)
        # OpenDC takes run-length rows: those of the fragments at T_i = 0, else its own
        self._shared = options.opendc and options.fragments and options.export_rate_s == 0
        self._opendc = ([FragmentBuilder(r, 0.0, sustainability, co2=False)
                         for r in range(replicas)]
                        if options.opendc and not self._shared else None)
        self._fragment_schema = fragment_schema(sustainability.carbon is not None)

    def __enter__(self) -> RunOutput:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)          # on an error, no file gets its final name

    def _write(self, name: str, data, schema: pa.Schema, **options) -> None:
        """Queue ``data`` for ``name``'s writer thread (pyarrow encodes without the GIL, so
        numpy builds the next rows meanwhile)."""
        if name not in self._writers:
            self._writers[name] = self._stack.enter_context(
                self.out.parquet(name, schema, **options))
            self._threads[name] = self._stack.enter_context(_Background())
            self.rows[name] = 0
        writer = self._writers[name]
        write = writer.write_table if isinstance(data, pa.Table) else writer.write_batch
        self.rows[name] += data.num_rows
        limit = self.options.row_limit
        if limit is not None and name.endswith("fragments.parquet") and self.rows[name] > limit:
            raise too_many_rows(name, self.rows[name], self.options)
        self._threads[name].submit(write, data)

    def requests(self, table: pa.Table) -> None:
        """Write a chunk of the request record."""
        self._write("requests.parquet", table, table.schema, **_PLAIN)

    def steps(self, batch: pa.RecordBatch, power: dict) -> None:
        """Write timeline intervals, and the fragment and OpenDC rows they complete."""
        if self.options.steps:
            self._write("steps.parquet", batch, batch.schema, **_PLAIN)
        if self._fragments is None and self._opendc is None:
            return
        get = {n: to_numpy(batch.column(n)) for n in ("replica", "start_s", "duration_s",
                                                         "kv_cache_bytes")}
        for r in np.unique(get["replica"]).tolist():
            mine = get["replica"] == r
            args = (get["start_s"][mine], get["duration_s"][mine], power["utilization"][mine],
                    power["power_w"][mine], get["kv_cache_bytes"][mine])
            self._emit(r, lambda builder, a=args: builder.add(*a))

    def _emit(self, r: int, call) -> None:
        if self._fragments is not None:
            for rows in call(self._fragments[r]):
                self._write("fragments.parquet", to_batch(rows, self._fragment_schema),
                            self._fragment_schema, **FRAGMENT_PARQUET_OPTIONS)
                if self._shared:
                    self._opendc_rows(rows)
        if self._opendc is not None:
            for rows in call(self._opendc[r]):
                self._opendc_rows(rows)

    def _opendc_rows(self, rows: dict) -> None:
        self._write("opendc/fragments.parquet", opendc_fragments(rows, self.gpu_mhz),
                    FRAGMENTS_SCHEMA)

    def finish(self, end_s: float, memory_bytes: float) -> dict:
        """Idle tails to ``end_s``, the OpenDC tasks (``memory_bytes`` per replica: weights
        plus KV pool); returns rows written per file."""
        for r in range(self.replicas):
            self._emit(r, lambda builder: builder.finish(end_s))
        if self.options.opendc:
            self._write("opendc/tasks.parquet", opendc_tasks(
                self.replicas, end_s, self.gpu_mhz, memory_bytes, self.options.start,
                gpus=self.sus.gpus_per_replica), TASKS_SCHEMA)
        self._stack.close()
        return dict(self.rows)



class _Background:
    """Runs one file's writes on a thread of its own, in order, at most ``depth`` waiting;
    errors surface on the next submit or on exit."""

    def __init__(self, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet")
        self._pending: deque[Future] = deque()
        self._depth = depth

    def submit(self, write, *args) -> None:
        """Queue ``write(*args)``; waits while ``depth`` writes are pending."""
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(write, *args))

    def __enter__(self) -> _Background:
        return self

    def __exit__(self, *exc) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
