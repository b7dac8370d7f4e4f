"""``tracer`` command line."""

from __future__ import annotations

import click

from archive.errors import clean_errors
from tracer.smi import CAPTURE_FIELDS, read_capture, samples_table


@click.group()
def main():
    """Tracer: measure LLM serving and write LLM Trace Archive datasets."""


@main.command("parse-smi")
@click.argument("capture", type=click.Path(dir_okay=False))
@click.option("--fields", default=",".join(CAPTURE_FIELDS), show_default=True,
              help="The --query-gpu fields, in the order nvidia-smi printed them.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="Parquet file of GPU samples to write.")
@click.option("--run-id", default=None, help="Run the samples belong to [default: the "
                                              "capture's file name].")
@clean_errors
def parse_smi(capture, fields, output, run_id):
    """Convert captured nvidia-smi CSV output into an archive GPU-samples Parquet table."""
    from pathlib import Path

    import pyarrow.parquet as pq

    fields = tuple(f.strip() for f in fields.split(","))
    samples = read_capture(capture, fields)
    pq.write_table(samples_table(samples, run_id or Path(capture).stem, fields), output)
    span = (samples["timestamp"].iloc[-1] - samples["timestamp"].iloc[0]).total_seconds()
    click.echo(f"{len(samples)} samples over {span:.1f} s; power "
               f"{samples['power_w'].min():.1f}–{samples['power_w'].max():.1f} W -> {output}")
