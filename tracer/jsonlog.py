"""Append-only JSON Lines logs: what the tracer writes as it measures (``measurements.jsonl``,
``requests.jsonl``, ``gpu_samples.jsonl``), and reading them back after a crash.

A process killed mid-write leaves at most one torn line, the last, without its newline.
:func:`cut_torn_tail` drops it before anything is appended (else the next record would be
glued to it and both lost); :func:`read_log` does that and parses the rest, where any other bad
line is an error, never a silently skipped record.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from archive.errors import InputError


class AppendLog:
    """A JSON Lines file appended one record at a time, flushed and fsync'd, from any
    thread."""

    def __init__(self, path: Path) -> None:
        self.lock = threading.Lock()
        self.file = open(path, "a")  # noqa: SIM115 (closed by close())

    def write(self, record: dict) -> None:
        with self.lock:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def cut_torn_tail(path: Path) -> bool:
    """Drop a last line that is not JSON and lacks its newline (a kill mid-write), or give a
    whole one its newline; returns whether a line was dropped."""
    if not path.exists():
        return False
    text = path.read_text()
    last = text.rsplit("\n", 1)[-1]
    if not last:
        return False
    try:
        json.loads(last)
    except json.JSONDecodeError:
        path.write_text(text[: len(text) - len(last)])
        return True
    with open(path, "a") as file:           # whole but for its newline: complete it
        file.write("\n")
    return False


def read_log(path: Path) -> tuple[list[dict], bool]:
    """The records of a log (none when it does not exist), after :func:`cut_torn_tail`;
    returns them and whether a torn line was dropped.

    Raises
    ------
    InputError
        For a line that is not JSON, other than a torn last one (naming file and line).
    """
    torn = cut_torn_tail(path)
    if not path.exists():
        return [], False
    rows = []
    for number, line in enumerate(path.read_text().split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"not JSON: {exc.msg}", path=path, row=number) from None
    return rows, torn
