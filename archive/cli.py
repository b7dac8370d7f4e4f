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


_CLIENT_RUNS = ("vllm-bench", "inference-perf", "guidellm", "tracer-bench")
_SERVING_OPTIONS = {"gpu": ("llmservingsim",), "workload": ("llmservingsim",),
                    "engine": _CLIENT_RUNS, "benchmark": ("guidellm",)}
"""Import options that only some kinds take (any other kind rejects them)."""


@main.command("import")
@click.argument("kind", type=click.Choice(["azure", "mooncake", "burstgpt", "marconi",
                                           "carbon", "measurements", "llmservingsim",
                                           *_CLIENT_RUNS]))
@click.argument("src", type=click.Path(exists=True))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--drop-invalid", is_flag=True,
              help="Drop bad rows (counted per reason in dataset.json) instead of stopping "
                   "(workload traces only).")
@click.option("--name", default=None, help="Dataset name [default: DEST's folder name].")
@click.option("--gpu", default=None, help="llmservingsim: the GPU, when meta.json does not "
              "record hardware.device_name.")
@click.option("--workload", type=click.Path(exists=True, dir_okay=False), default=None,
              help="llmservingsim: the JSON Lines workload that was sent (input_tok_ids), for "
                   "the prompts' prefix-block hashes.")
@click.option("--engine", type=click.Path(exists=True, dir_okay=False), default=None,
              help="vllm-bench, inference-perf, guidellm: JSON of the engine settings the "
                   "result does not record (gpu, version, max_num_seqs, "
                   "max_num_batched_tokens, ...).")
@click.option("--benchmark", type=click.IntRange(min=0), default=None,
              help="guidellm: which benchmark of the report (0-based) [the only one].")
@click.option("--licence", default="see source", help="Licence of the data, for the card.")
@clean_errors
def import_(kind, src, dest, drop_invalid, name, gpu, workload, engine, benchmark, licence):
    """Convert a public trace or serving run into an archive dataset folder (Parquet,
    dataset.json, card). SRC is a file, or for llmservingsim a run folder."""
    from archive.errors import InputError

    given = {"gpu": gpu, "workload": workload, "engine": engine, "benchmark": benchmark}
    for option, kinds in _SERVING_OPTIONS.items():
        if given[option] is not None and kind not in kinds:
            raise InputError(f"only for {', '.join(kinds)} imports", field=f"--{option}")
    workload_kinds = ("azure", "mooncake", "burstgpt", "marconi")
    if drop_invalid and kind not in workload_kinds:
        raise InputError("only for workload traces", field="--drop-invalid")
    if licence != "see source" and kind in workload_kinds:
        raise InputError("a workload trace's licence is its publisher's (set by the importer)",
                         field="--licence")
    if kind == "carbon":
        from archive.importers.carbon import import_carbon

        meta = import_carbon(src, dest, name, licence)
    elif kind == "measurements":
        from archive.measurements import import_measurements

        meta = import_measurements(src, dest, name, licence)
    elif kind == "llmservingsim":
        from archive.importers.serving import import_llmservingsim

        meta = import_llmservingsim(src, dest, name, gpu, workload, licence)
    elif kind in _CLIENT_RUNS:
        from archive.importers import serving

        if engine is None:
            raise InputError(f"{kind} imports need the engine settings", field="--engine")
        if kind == "guidellm":
            meta = serving.import_guidellm(src, dest, engine, benchmark, name, licence)
        else:
            importer = {"vllm-bench": serving.import_vllm_bench,
                        "inference-perf": serving.import_inference_perf,
                        "tracer-bench": serving.import_tracer_bench}[kind]
            meta = importer(src, dest, engine, name, licence)
    else:
        from archive.importers.workloads import import_workload

        meta = import_workload(kind, src, dest, drop_invalid, name)
    dropped = sum((meta.get("dropped_rows") or {}).values())
    click.echo(f"wrote {dest}: {meta['rows']:,} rows" + (f", {dropped:,} dropped ("
               + ", ".join(f"{n:,} {r}" for r, n in meta["dropped_rows"].items()) + ")"
                                                         if dropped else ""))
    if meta.get("engine", {}).get("assumed"):
        click.echo(f"not recorded by the run, vLLM defaults assumed: "
                   f"{', '.join(meta['engine']['assumed'])}")


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
