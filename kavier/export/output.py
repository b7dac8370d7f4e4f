"""Writing a run's output folder so that a crash never leaves a partial run looking complete.

Every file is first written as ``<name>.partial`` and renamed when complete; ``summary.json`` is
written last, so its presence marks a finished run. On failure the partial files are removed.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from archive.errors import InputError


class RunWriter:
    """Collects the files of one run in ``folder`` (see module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._partials: list[Path] = []

    def _partial(self, name: str) -> tuple[Path, Path]:
        final = self.folder / name
        tmp = final.with_name(final.name + ".partial")
        self._partials.append(tmp)
        return tmp, final

    @contextmanager
    def parquet(self, name: str, schema: pa.Schema, **options) -> Iterator[pq.ParquetWriter]:
        """Context manager yielding a :class:`pyarrow.parquet.ParquetWriter` for ``name``
        (one row group per written batch); the file gets its final name when the block ends
        without error. ``options`` go to the writer."""
        tmp, final = self._partial(name)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(tmp, schema, **options) as writer:
            yield writer
        tmp.replace(final)

    def table(self, name: str, table: pa.Table) -> Path:
        """Write one Parquet table."""
        return self.batches(name, table.schema, table.to_batches())

    def batches(self, name: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> Path:
        """Write a Parquet file batch by batch (one row group per batch); returns its path."""
        with self.parquet(name, schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
        return self.folder / name

    def file(self, name: str, write: Callable[[Path], object]) -> Path:
        """Write a file with ``write(path)`` (e.g. a figure's ``savefig``); returns its path."""
        tmp, final = self._partial(name)
        write(tmp)
        tmp.replace(final)
        return final

    def text(self, name: str, text: str) -> Path:
        """Write a text file."""
        return self.file(name, lambda path: path.write_text(text))

    def json(self, name: str, obj) -> Path:
        """Write a JSON file (indented, keys in insertion order)."""
        return self.text(name, json.dumps(obj, indent=2, default=float) + "\n")

    def cleanup(self) -> None:
        """Remove leftover partial files."""
        for tmp in self._partials:
            tmp.unlink(missing_ok=True)


LOCK_FILE = ".kavier.lock"


@contextmanager
def run_folder(folder: str | Path):
    """Context manager yielding a :class:`RunWriter`; removes partial files on error.

    The folder is held exclusively (an advisory ``flock`` on ``.kavier.lock``, which the kernel
    releases when the process ends, however it ends): a second run into the same folder stops
    at once with a one-line error instead of mixing its files with the first's. A stale
    ``summary.json`` from an earlier run is removed first, so an interrupted run is never
    mistaken for a finished one.

    Raises
    ------
    InputError
        When the folder cannot be created, another run holds it, or writing into it fails
        (``OSError``: a full or read-only disk, a file where a folder must go), one line.
    """
    writer = RunWriter(folder)
    try:
        writer.folder.mkdir(parents=True, exist_ok=True)
        lock = open(writer.folder / LOCK_FILE, "a")  # noqa: SIM115 (held for the run)
    except OSError as exc:
        raise InputError(f"cannot create the output folder: {exc.strerror}",
                         path=folder) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError("another run is writing into this folder; wait for it or choose "
                             "another --output-folder", path=folder) from None
        try:
            (writer.folder / "summary.json").unlink(missing_ok=True)
            yield writer
        except OSError as exc:            # a full or read-only disk, a file in a folder's place
            where = f" {exc.filename}" if exc.filename else ""
            raise InputError(f"cannot write the output{where}: "
                             f"{exc.strerror or str(exc).splitlines()[0]}",
                             path=folder) from None
        finally:
            writer.cleanup()
