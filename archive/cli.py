"""``archive`` command line: list, describe and rebuild the bundled datasets."""

from __future__ import annotations

import sys

import click

from archive.datasets import dataset_dir, info, list_datasets
from archive.errors import InputError

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
def info_(name):
    """Show a dataset's metadata."""
    try:
        meta = info(name)
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    for key, value in meta.items():
        click.echo(f"{key}: {value}")
    click.echo(f"path: {dataset_dir(name)}")


@main.command()
@click.argument("name", type=click.Choice(sorted(_REBUILDERS)))
def rebuild(name):
    """Re-create a dataset's normalized table from its raw files."""
    import importlib

    try:
        out = importlib.import_module(_REBUILDERS[name]).rebuild(dataset_dir(name))
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {out}")
