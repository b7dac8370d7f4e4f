"""The one error type the toolkit raises for bad input.

Every component (archive readers, the simulator, calibration, the tracer) raises
:class:`InputError` when a file, a row or a field a user gave is wrong. The command-line tools
catch it and print ``error: <message>`` on one line with exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import math
import sys
from os import PathLike

import click


class InputError(ValueError):
    """Bad user input, located as precisely as possible.

    Parameters
    ----------
    message : str
        What is wrong, in words a user can act on.
    path : str or PathLike, optional
        The file the problem is in.
    row : int, optional
        1-based line number in the file (for CSV the header is line 1), or 1-based row number for
        Parquet/JSON tables.
    field : str, optional
        The column or option at fault.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | PathLike | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.row = row
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
        if self.row is not None:
            where.append(f"line {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return (": ".join(where) + ": " if where else "") + self.message


def shown(value, width: int = 40) -> str:
    """``repr`` of a value a user wrote, for error messages: numpy scalars as the Python value
    (``-1.25``, not ``np.float64(-1.25)``), cut to ``width`` characters."""
    import numpy as np

    if isinstance(value, np.generic):
        value = value.item()
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def read_json_object(path: str | PathLike, what: str = "file") -> dict:
    """The JSON object in the file ``path``.

    Raises
    ------
    InputError
        When the file cannot be read, is not JSON, or holds something other than an object;
        ``what`` names the file's role in the message ("profile", "engine settings").
    """
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read {what}: {exc.strerror}", path=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON: {exc}", path=path) from None
    if not isinstance(data, dict):
        raise InputError(f"a {what} must be a JSON object", path=path)
    return data


def first_bad(mask) -> int:
    """0-based position of the first True in a boolean Series or array (the row to report)."""
    return int(getattr(mask, "to_numpy", lambda: mask)().argmax())


def clean_errors(command):
    """Decorate a click command: :class:`InputError` becomes ``error: ...`` on stderr and exit
    status 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InputError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


class Number(click.FloatRange):
    """A command-line number: :class:`click.FloatRange` that also refuses NaN, which passes
    every range comparison, and infinity unless ``allow_inf`` (an option documenting what
    ``inf`` means, such as a request rate of "all at once"). Click prints the refusal as its
    one-line usage error (exit 2).
    """

    def __init__(self, min: float | None = None, max: float | None = None,
                 min_open: bool = False, max_open: bool = False, allow_inf: bool = False):
        super().__init__(min, max, min_open, max_open)
        self.allow_inf = allow_inf

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number) or (math.isinf(number) and not self.allow_inf):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number
