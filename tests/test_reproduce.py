"""``kavier reproduce``: every experiment runs, the notebooks execute, sweeps give the same
results locally and on a Dask cluster."""

import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from click.testing import CliRunner
from nbclient import NotebookClient

from kavier.analysis.reproduce import EXPERIMENTS
from kavier.cli import main

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_notebook_executes_and_writes_data_figure_report(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KAVIER_QUICK", "1")
    monkeypatch.setenv("KAVIER_OUT", str(tmp_path))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    out = tmp_path / name
    assert (out / "report.md").read_text().count("thesis") + (
        out / "report.md").read_text().count("Thesis") >= 1
    assert list(out.glob("*.png")) and list(out.glob("*.pdf")) and list(out.glob("*.csv"))
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]


def test_sweeps_are_identical_locally_and_on_a_dask_cluster(tmp_path):
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                      host="127.0.0.1", dashboard_address=None) as cluster:
        result = CliRunner().invoke(main, ["reproduce", "prefix-length", "--quick",
                                           "--scheduler", cluster.scheduler_address,
                                           "--output-folder", str(tmp_path / "dask")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["reproduce", "prefix-length", "--quick", "--workers",
                                       "2", "--output-folder", str(tmp_path / "local")])
    assert result.exit_code == 0, result.output
    dask_data = pd.read_csv(tmp_path / "dask" / "prefix-length" / "prefix_length.csv")
    local = pd.read_csv(tmp_path / "local" / "prefix-length" / "prefix_length.csv")
    pd.testing.assert_frame_equal(dask_data, local)
    # longer required prefixes can only lower the hit ratio (same cache, same trace)
    marconi = local[(local["trace"] == "marconi") & (local["cache_prompts"] == 8)]
    assert marconi["hit_ratio_requests"].is_monotonic_decreasing
    assert (local["prefill_saving"] >= -1e-12).all()


def test_unreachable_scheduler_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["reproduce", "kv-cache", "--quick", "--scheduler",
                                       "tcp://127.0.0.1:9", "--output-folder", str(tmp_path)])
    assert result.exit_code == 2 and "Dask scheduler" in result.output
    assert not (tmp_path / "kv-cache" / "summary.json").exists()


def test_kv_cache_experiment_by_hand(tmp_path):
    result = CliRunner().invoke(main, ["reproduce", "kv-cache", "--quick", "--workers", "1",
                                       "--output-folder", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = pd.read_csv(tmp_path / "kv-cache" / "kv_cache.csv")
    assert set(data["workload"]) == {"marconi", "azure"}
    data = data[data["workload"] == "azure"]
    wide = data.pivot_table(index=["timing", "llm"], columns="kv", values="decode_gpu_years")
    assert (wide[False] >= wide[True]).all()
    # eq. 4.3 vs 4.4 for the thesis model: the ratio is the same for every model
    thesis = wide.loc["thesis"]
    assert (thesis[False] / thesis[True]).nunique() == 1 or (
        (thesis[False] / thesis[True]).std() < 1e-9)
    assert os.path.exists(tmp_path / "kv-cache" / "kv_cache.pdf")
    # the printed comparison: the thesis's MF5 numbers beside ours, one row each
    comparison = pd.read_csv(tmp_path / "kv-cache" / "comparison.csv")
    assert list(comparison["thesis"]) == [58.76, 0.11, 497, 497]
    printed = result.output.splitlines()
    assert "thesis" in printed[-5] and "ours" in printed[-5]
    for row, line in zip(comparison.itertuples(), printed[-4:], strict=True):
        assert line.startswith("kv-cache") and f"{row.ours:.4g}" in line
    every = pd.read_csv(tmp_path / "kv-cache" / "kv_cache.csv")
    off = every[(every["workload"] == "marconi") & (every["timing"] == "thesis") & ~every["kv"]]
    assert comparison["ours"][0] == pytest.approx(off["decode_gpu_years"].sum())
