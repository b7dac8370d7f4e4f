from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from archive.errors import InputError
from archive.smi import parse, read_capture
from tracer.cli import main

CAPTURE = Path(__file__).parent / "data" / "nvidia-smi-h100-loop100ms.csv"


def test_real_h100_capture_parses():
    samples = read_capture(CAPTURE)
    assert len(samples) == 2915
    assert samples["timestamp"].is_monotonic_increasing
    assert 70 < samples["power_w"].min() < 80 and samples["power_w"].max() > 600
    assert samples["utilization_gpu_pct"].between(0, 100).all()
    step = samples["timestamp"].diff().dt.total_seconds().median()
    assert 0.09 < step < 0.12


def test_bad_lines_are_located():
    good = "2026/11/23 07:07:03.405, 0, 0, 73.84, 0, 345, 34"
    with pytest.raises(InputError, match="line 2: field 'power.draw'"):
        parse([good, "2026/11/23 07:07:03.505, 0, 0, [N/A], 0, 345, 34"])
    with pytest.raises(InputError, match="line 1: expected 7 values"):
        parse(["1, 2"])
    with pytest.raises(InputError, match="unknown nvidia-smi field"):
        parse([good], ("timestamp", "fan.speed"))
    # inf and negative values had passed (a dataset with 'power -5.0–709.1 W', and a
    # calibrate-power traceback from scikit-learn); [N/A] is a gap only when the caller allows
    for value in ("inf", "-5", "nan"):
        with pytest.raises(InputError, match=rf"line 2: field 'power.draw': not a finite, "
                                             rf"non-negative number: '{value}'"):
            parse([good, f"2026/11/23 07:07:03.505, 0, 0, {value}, 0, 345, 34"], missing_ok=True)
    gap = parse([good, "2026/11/23 07:07:03.505, 0, 0, [N/A], 0, 345, 34"], missing_ok=True)
    assert gap["power_w"].isna().tolist() == [False, True]


def test_cli_writes_parquet(tmp_path):
    out = tmp_path / "samples.parquet"
    result = CliRunner().invoke(main, ["parse-smi", str(CAPTURE), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(out)) == 2915
    import pyarrow.parquet as pq

    from archive.schema import GPU_SAMPLES

    table = pq.read_table(out)
    assert table.schema.equals(GPU_SAMPLES)
    assert set(table.column("power_field").to_pylist()) == {"power.draw"}
    assert set(table.column("run_id").to_pylist()) == {"nvidia-smi-h100-loop100ms"}
    named = CliRunner().invoke(main, ["parse-smi", str(CAPTURE), "-o", str(out), "--run-id",
                                      "h100-loop"])
    assert named.exit_code == 0 and set(pq.read_table(out).column("run_id").to_pylist()) == {
        "h100-loop"}
    empty = CliRunner().invoke(main, ["parse-smi", str(CAPTURE), "-o", str(out), "--run-id", " "])
    assert empty.exit_code == 2 and "field 'run-id': must not be empty" in empty.output
