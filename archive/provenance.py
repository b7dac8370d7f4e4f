"""Provenance every written artifact carries: the toolkit's version."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def toolkit_version() -> str:
    """Installed version of the ``kavier-toolkit`` distribution ("unknown" when not
    installed)."""
    try:
        return version("kavier-toolkit")
    except PackageNotFoundError:
        return "unknown"
