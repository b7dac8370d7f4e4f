"""``archive`` command line: list, describe and rebuild the bundled datasets."""

from __future__ import annotations

import click

from archive.datasets import dataset_dir, info, list_datasets
from archive.errors import clean_errors

_REBUILDERS = {"a10-surf-vllm-llama3-8b": "archive.importers.a10_surf"}


@click.group()
def main():
    """The LLM Trace Archive: bundled measurement and workload datasets."""


@main.command("list")
def list_():
    """List the bundled datasets."""
    for name in list_datasets():
        meta = info(name)
        click.echo(f"{name:<34} {meta['kind']:<13} {meta['rows']:>7,} rows  {meta['licence']}")


@main.command("info")
@click.argument("name")
@clean_errors
def info_(name):
    """Show a dataset's metadata."""
    meta = info(name)
    for key, value in meta.items():
        click.echo(f"{key}: {value}")
    click.echo(f"path: {dataset_dir(name)}")


@main.command()
@click.argument("name", type=click.Choice(sorted(_REBUILDERS)))
@clean_errors
def rebuild(name):
    """Re-create a dataset's normalized table from its raw files."""
    import importlib

    out = importlib.import_module(_REBUILDERS[name]).rebuild(dataset_dir(name))
    click.echo(f"wrote {out}")
