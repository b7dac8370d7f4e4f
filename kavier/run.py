"""Stream a simulation into its output folder: requests, fragments, OpenDC workload.

Simulated requests arrive chunk by chunk; each chunk is written at once to
``requests.parquet``, expanded into ``fragments.parquet`` row groups of at most
``flush_rows`` rows, and into ``opendc/tasks.parquet`` and ``opendc/fragments.parquet``, so memory
stays flat however long the trace is. Files are written as ``.partial`` and renamed when
complete (:mod:`kavier.output`); the caller writes ``summary.json`` last.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from itertools import chain

import pyarrow as pa
from tqdm import tqdm

from kavier.engine import Simulator
from kavier.fragments import FRAGMENT_PARQUET_OPTIONS, fragment_batches, fragment_schema
from kavier.opendc import DEFAULT_START, FRAGMENTS_SCHEMA, TASKS_SCHEMA, opendc_batches
from kavier.output import RunWriter

OUTPUT_FILES = ("requests.parquet", "fragments.parquet", "opendc/tasks.parquet",
                "opendc/fragments.parquet", "steps.parquet")
"""Files a simulation run may write, sequential or batched (besides ``summary.json``); a new
run removes them first, so none is left over from an earlier run."""
FLUSH_ROWS = 524_288
"""Default fragment rows per row group. Each pending row group holds its rows in memory until
written, so this bounds the run's memory: ``kavier simulate`` of the Marconi-shaped benchmark
at 0.1 s export peaks at 0.29 GB RSS with 524,288 rows (0.43 GB with 2,000,000) and takes
0.64–0.66 s instead of 0.67–0.76 s (``/usr/bin/time``, three runs each, 2-core dev machine)."""
_PLAIN = {"use_dictionary": False}
"""Writer options for the per-request tables: their values rarely repeat, and skipping the
dictionary attempt halves their writing time."""


@dataclass(frozen=True)
class ExportOptions:
    """What a run writes.

    Attributes
    ----------
    export_rate_s : float
        Snapshot interval of ``fragments.parquet``, s; 0 for run-length phases.
    fragments : bool
        Write ``fragments.parquet``.
    opendc : bool
        Write the OpenDC workload (``opendc/``).
    flush_rows : int
        Fragment rows per row group at most; bounds memory.
    utilization_cap : float
        GPU utilization while inferring (Listing 4.3).
    start : datetime
        Wall-clock instant of simulated time 0 (timezone-aware), for OpenDC's submission
        times.
    fragment_energy : bool
        Add ``power_w``, ``energy_wh`` (and ``co2_g``) to ``fragments.parquet`` when the
        simulator has a power model. Requests and the summary carry energy regardless.
    """

    export_rate_s: float = 0.1
    fragments: bool = True
    opendc: bool = True
    flush_rows: int = FLUSH_ROWS
    utilization_cap: float = 1.0
    start: datetime = DEFAULT_START
    fragment_energy: bool = True


def _fragment_energy(simulator: Simulator, options: ExportOptions):
    return simulator.sustainability if options.fragment_energy else None


def write_run(chunks: Iterable[pa.Table], simulator: Simulator, out: RunWriter,
              options: ExportOptions, n_requests: int | None = None) -> dict:
    """Write simulated request chunks (from :func:`kavier.engine.run` or
    :meth:`Simulator.step`) and their fragments into ``out``.

    A progress bar (requests) shows on a terminal when the run takes more than two seconds.

    Returns
    -------
    dict
        Rows written per file.

    Raises
    ------
    ValueError
        When OpenDC export is asked for a GPU without a boost clock in the library.
    """
    gpu_mhz = simulator.timing.gpu.boost_clock_mhz
    if options.opendc and not gpu_mhz:
        raise ValueError(f"GPU {simulator.timing.gpu.name} has no boost_clock_mhz in the GPU "
                         "library, which OpenDC's capacity needs; add it or pass --no-opendc")
    for name in OUTPUT_FILES:
        (out.folder / name).unlink(missing_ok=True)
    chunks = iter(chunks)
    first = next(chunks)
    wanted = ["requests.parquet"] + ["fragments.parquet"] * options.fragments + [
        "opendc/tasks.parquet", "opendc/fragments.parquet"] * options.opendc
    schemas = {"requests.parquet": first.schema,
               "fragments.parquet": fragment_schema(_fragment_energy(simulator, options)),
               "opendc/tasks.parquet": TASKS_SCHEMA,
               "opendc/fragments.parquet": FRAGMENTS_SCHEMA}
    rows = dict.fromkeys(wanted, 0)
    with ExitStack() as stack:
        writers = {name: stack.enter_context(out.parquet(
            name, schemas[name], **(FRAGMENT_PARQUET_OPTIONS if name == "fragments.parquet"
                                    else _PLAIN))) for name in wanted}
        background = stack.enter_context(_Background())      # fragments
        small = stack.enter_context(_Background())           # requests, OpenDC
        bar = stack.enter_context(tqdm(total=n_requests, unit="req", disable=None, delay=2.0,
                                       leave=False, desc="simulate"))
        for chunk in chain([first], chunks):
            small.submit(writers["requests.parquet"].write_table, chunk)
            rows["requests.parquet"] += chunk.num_rows
            if options.fragments:
                rows["fragments.parquet"] += _write_fragments(
                    background, writers["fragments.parquet"], chunk, simulator, options)
            if options.opendc:
                batches = opendc_batches(chunk, gpu_mhz, simulator.timing.llm.weight_bytes,
                                         options.utilization_cap, options.start)
                for name, batch in zip(wanted[-2:], batches, strict=True):
                    small.submit(writers[name].write_batch, batch)
                    rows[name] += batch.num_rows
            bar.update(chunk.num_rows)
    return rows


class _Background:
    """Runs writes on one background thread, in order, at most ``depth`` waiting, so that
    numpy generates the next batches while pyarrow encodes the last (both release the GIL).
    Fragments get one such thread and the small per-request files another, so the fragment
    encoder never waits behind them. Errors surface on the next submit or on exit."""

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


def _write_fragments(background, writer, chunk, simulator, options) -> int:
    """Fragments of one chunk of requests, in row groups of ``flush_rows`` rows (the last one
    of the chunk shorter); returns the rows written."""
    pending, n_pending, written = [], 0, 0
    batches = fragment_batches(chunk, options.export_rate_s, simulator.kv_bytes_per_token,
                               options.utilization_cap,
                               sustainability=_fragment_energy(simulator, options))
    for batch in chain(batches, [None]):
        if batch is not None:
            pending.append(batch)
            n_pending += batch.num_rows
        if pending and (batch is None or n_pending >= options.flush_rows):
            background.submit(writer.write_table, pa.Table.from_batches(pending),
                              options.flush_rows)
            written += n_pending
            pending, n_pending = [], 0
    return written
