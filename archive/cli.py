"""``archive`` command line: list, describe, validate, import and rebuild datasets."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from archive.datasets import dataset_dir, info, list_datasets
from archive.errors import clean_errors

_REBUILDERS = {
    "a10-surf-vllm-llama3-8b": ("archive.importers.a10_surf", ()),
    "azure-llm-inference-2023-conv": ("archive.importers.workloads",
                                      ("azure", "AzureLLMInferenceTrace_conv.csv")),
    "mooncake-fast25-conversation": ("archive.importers.workloads",
                                     ("mooncake", "conversation_trace.jsonl")),
}
"""Bundled datasets whose table is derived from raw files kept beside it."""


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

    module, args = _REBUILDERS[name]
    out = importlib.import_module(module).rebuild(dataset_dir(name), *args)
    click.echo(f"wrote {out}")


@main.command("import")
@click.argument("kind", type=click.Choice(["azure", "mooncake", "burstgpt", "marconi",
                                           "carbon"]))
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--drop-invalid", is_flag=True,
              help="Drop bad rows (counted per reason in dataset.json) instead of stopping.")
@click.option("--name", default=None, help="Dataset name [default: DEST's folder name].")
@clean_errors
def import_(kind, src, dest, drop_invalid, name):
    """Convert a public trace into an archive dataset folder (Parquet, dataset.json, card)."""
    if kind == "carbon":
        from archive.importers.carbon import import_carbon

        meta = import_carbon(src, dest, name)
    else:
        from archive.importers.workloads import import_workload

        meta = import_workload(kind, src, dest, drop_invalid, name)
    dropped = sum((meta.get("dropped_rows") or {}).values())
    click.echo(f"wrote {dest}: {meta['rows']:,} rows" + (f", {dropped:,} dropped ("
               + ", ".join(f"{n:,} {r}" for r, n in meta["dropped_rows"].items()) + ")"
                                                         if dropped else ""))


@main.command()
@click.argument("path", type=click.Path())
def validate(path):
    """Check a dataset folder (metadata, checksums, schema, values); report every problem."""
    from archive.datasets import data_root
    from archive.validate import validate as check

    folder = path if Path(path).exists() or path not in list_datasets() else data_root() / path
    problems = check(folder)
    for problem in problems:
        click.echo(problem)
    click.echo(f"{folder}: {'valid' if not problems else f'{len(problems)} problem(s)'}")
    sys.exit(1 if problems else 0)
