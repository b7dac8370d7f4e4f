"""``archive import`` and ``archive validate``: round trips for every kind, bad rows, every
problem reported."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import archive
from archive.cli import main as archive_cli
from archive.importers.workloads import import_workload
from archive.traces import read_trace
from archive.validate import validate
from kavier.cli import main as kavier_cli

SAMPLES = {
    "azure": ("trace.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
              "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n"
              "2023-11-16 18:15:51.0000000,879,9\n"),
    "burstgpt": ("burst.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,"
                 "Log Type\n5,ChatGPT,472,18,490,Conversation log\n"
                 "45,GPT-4,94,11,105,API log\n46,ChatGPT,3090,0,3090,API log\n"),
    "mooncake": ("trace.jsonl", "".join(json.dumps(r) + "\n" for r in [
        {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
        {"timestamp": 250, "input_length": 1030, "output_length": 7, "hash_ids": [0, 1, 3]},
        {"timestamp": 900, "input_length": 600, "output_length": 3, "hash_ids": [4, 5]}])),
    "marconi": ("marconi.csv", "session_id,turn_id,ts,num_input_tokens,num_output_tokens,"
                "input_tokens,output_tokens\n"
                '0,0,0.0,4,2,"[1, 100, 101, 2]","[1, 2]"\n'
                '1,0,4.0,3,2,"[1, 300, 2]","[1, 2]"\n'
                '0,1,9.0,6,2,"[1, 100, 101, 2, 7, 8]","[1, 2]"\n'),
}


def run(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_import_validate_load_simulate(kind, tmp_path):
    name, text = SAMPLES[kind]
    (tmp_path / name).write_text(text)
    dest = tmp_path / "dataset"
    result = run(archive_cli, "import", kind, tmp_path / name, dest)
    assert result.exit_code == 0, result.output
    assert run(archive_cli, "validate", dest).exit_code == 0
    meta = json.loads((dest / "dataset.json").read_text())
    assert meta["rows"] == 3 and meta["licence"] and len(meta["sha256"]["workload.parquet"]) == 64
    assert "## Columns" in (dest / "README.md").read_text()
    workload = read_trace(dest)
    assert len(workload.requests) == 3 and (workload.requests["n_input_tokens"] > 0).all()
    assert workload.requests["arrival_s"].iloc[0] == (5.0 if kind == "burstgpt" else 0.0)
    args = ["simulate", "--trace", dest, "--output-folder", tmp_path / "sim"]
    if kind == "marconi":
        assert workload.content.kind == "tokens"
        args += ["--prefix-cache-policy", "prefill", "--prefix-cache-min-tokens", "3",
                 "--cache-scope", "session"]
    if kind == "mooncake":
        assert (workload.content.kind, workload.content.block_size) == ("hashes", 512)
        args += ["--prefix-cache-policy", "blocks", "--max-num-seqs", "1"]
    result = run(kavier_cli, *args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["n_requests"] == 3
    if kind in ("marconi", "mooncake"):
        assert summary["prefix_cache"]["hit_rate_requests"] == pytest.approx(1 / 3)
        assert summary["prefix_cache"]["hits_tokens"] > 0


def test_bad_rows_are_rejected_or_dropped_and_counted(tmp_path):
    src = tmp_path / "burst.csv"
    src.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                   "5,ChatGPT,472,18,490,x\n6,ChatGPT,-3,18,15,x\n7,ChatGPT,12,1.5,13,x\n"
                   "8,ChatGPT,12,4,16,x\n")
    result = run(archive_cli, "import", "burstgpt", src, tmp_path / "a")
    assert result.exit_code == 2
    assert "line 3: field 'Request tokens'" in result.output and "--drop-invalid" in result.output
    assert not (tmp_path / "a" / "workload.parquet").exists()
    result = run(archive_cli, "import", "burstgpt", src, tmp_path / "b", "--drop-invalid")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "b" / "dataset.json").read_text())
    assert meta["rows"] == 2
    assert meta["dropped_rows"] == {"invalid Request tokens": 1, "invalid Response tokens": 1}


def test_infinite_and_huge_values_are_dropped_not_wrapped(tmp_path):
    src = tmp_path / "burst.csv"
    src.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                   "5,ChatGPT,472,18,490,x\n6,ChatGPT,inf,18,15,x\n7,ChatGPT,1e23,2,13,x\n"
                   "inf,ChatGPT,12,4,16,x\n9,ChatGPT,12,4,16,x\n")
    result = run(archive_cli, "import", "burstgpt", src, tmp_path / "b", "--drop-invalid")
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "b" / "workload.parquet")
    assert len(table) == 2 and (table["n_input_tokens"] >= 0).all()
    assert np.isfinite(table["arrival_s"]).all()


def test_session_turns_must_increase(tmp_path):
    src = tmp_path / "m.csv"
    src.write_text("session_id,turn_id,ts,num_input_tokens,num_output_tokens,input_tokens\n"
                   '0,0,0.0,1,1,"[5]"\n0,1,1.0,1,1,"[5]"\n0,1,2.0,1,1,"[5]"\n')
    result = run(archive_cli, "import", "marconi", src, tmp_path / "a")
    assert result.exit_code == 2 and "line 4: field 'turn_id'" in result.output


def test_streaming_does_not_change_the_result(tmp_path):
    name, text = SAMPLES["marconi"]
    (tmp_path / name).write_text(text)
    import_workload("marconi", tmp_path / name, tmp_path / "one", chunk_rows=1)
    import_workload("marconi", tmp_path / name, tmp_path / "all", chunk_rows=1000)
    one = pq.read_table(tmp_path / "one" / "workload.parquet")
    assert one.equals(pq.read_table(tmp_path / "all" / "workload.parquet"))


def test_validate_reports_every_problem(tmp_path):
    name, text = SAMPLES["azure"]
    (tmp_path / name).write_text(text)
    dest = tmp_path / "d"
    import_workload("azure", tmp_path / name, dest)
    table = pq.read_table(dest / "workload.parquet")
    tokens = table.column("n_input_tokens").to_pylist()
    tokens[1] = -5
    table = table.set_column(table.schema.get_field_index("n_input_tokens"),
                             table.schema.field("n_input_tokens"), pa.array(tokens, pa.int64()))
    pq.write_table(table, dest / "workload.parquet")      # changed behind dataset.json's back
    (dest / "README.md").unlink()
    meta = json.loads((dest / "dataset.json").read_text())
    del meta["licence"]
    (dest / "dataset.json").write_text(json.dumps(meta))
    problems = validate(dest)
    text = "\n".join(problems)
    assert "missing key 'licence'" in text and "SHA-256 differs" in text
    assert "README.md" in text and "negative n_input_tokens (rows 2)" in text
    result = run(archive_cli, "validate", dest)
    assert result.exit_code == 1 and f"{len(problems)} problem(s)" in result.output


def test_carbon_import_and_every_bundled_dataset_is_valid(tmp_path):
    src = tmp_path / "c.csv"
    pd.DataFrame({"timestamp": pd.date_range("2022-07-01", periods=4, freq="15min"),
                  "carbon_intensity": [100.0, 120.0, 90.0, 80.0]}).to_csv(src, index=False)
    assert run(archive_cli, "import", "carbon", src, tmp_path / "c").exit_code == 0
    assert validate(tmp_path / "c") == []
    trace = tmp_path / "t.csv"
    trace.write_text("num_input_tokens,num_output_tokens\n100,20\n")
    result = run(kavier_cli, "simulate", "--trace", trace, "--carbon-trace", tmp_path / "c",
                 "--start", "2022-07-01T00:10Z", "--output-folder", tmp_path / "sim")
    assert result.exit_code == 0, result.output
    co2 = json.loads((tmp_path / "sim" / "summary.json").read_text())["sustainability"]["co2_g"]
    energy_kwh = json.loads((tmp_path / "sim" / "summary.json").read_text())[
        "sustainability"]["energy_gpu_wh"] / 1000
    assert co2 == pytest.approx(energy_kwh * 100.0, rel=1e-6)     # all inside the 100 g step
    for name in archive.list_datasets():
        assert validate(archive.dataset_dir(name)) == [], name


def test_validate_catches_nulls_nans_versions_and_truncation(tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = archive.dataset_dir("azure-llm-inference-2023-conv")
    main = json.loads((src / "dataset.json").read_text())["main_table"]
    cases = {}
    for case in ("null", "nan", "version", "truncated"):
        dest = tmp_path / case
        shutil.copytree(src, dest)
        cases[case] = dest
    table = pq.read_table(src / main)
    n_in = table.column("n_input_tokens").to_pylist()
    n_in[3] = None
    pq.write_table(table.set_column(table.schema.get_field_index("n_input_tokens"),
                                    table.schema.field("n_input_tokens").with_nullable(True),
                                    pa.array(n_in, pa.int64())), cases["null"] / main)
    arrival = table.column("arrival_s").to_numpy().copy()
    arrival[5] = float("nan")
    pq.write_table(table.set_column(table.schema.get_field_index("arrival_s"), "arrival_s",
                                    pa.array(arrival)), cases["nan"] / main)
    meta = json.loads((cases["version"] / "dataset.json").read_text())
    meta["schema_version"] = "9.0"
    (cases["version"] / "dataset.json").write_text(json.dumps(meta))
    data = (src / main).read_bytes()
    (cases["truncated"] / main).write_bytes(data[: len(data) // 2])
    expected = {"null": "a null in required column n_input_tokens (rows 4)",
                "nan": "a NaN or infinite arrival_s (rows 6)",
                "version": "schema_version '9.0' is not one this toolkit knows",
                "truncated": "cannot read as Parquet"}
    for case, dest in cases.items():
        problems = validate(dest)
        assert any(expected[case] in p for p in problems), (case, problems)
        assert len(set(problems)) == len(problems), problems      # each problem once
        result = run(archive_cli, "validate", dest)
        assert result.exit_code == 1 and "Traceback" not in result.output
    # simulation and calibration check the checksum before use
    result = run(kavier_cli, "simulate", "--trace", cases["nan"], "--output-folder",
                 tmp_path / "sim")
    assert result.exit_code == 2 and "SHA-256 differs" in result.output, result.output


def test_measurements_from_csv_read_and_import(tmp_path):
    from archive.measurements import read_measurements

    df = archive.load("a10-surf-vllm-llama3-8b")
    cols = ["sweep", "n_input_tokens", "n_output_tokens", "n_output_tokens_requested",
            "latency_s", "gpu", "model", "engine", "engine_version"]
    csv = tmp_path / "mine.csv"
    df[cols].to_csv(csv, index=False)
    back = read_measurements(csv)
    assert back["n_input_tokens"].tolist() == df["n_input_tokens"].tolist()
    assert np.allclose(back["latency_s"], df["latency_s"])
    dest = tmp_path / "ds"
    assert run(archive_cli, "import", "measurements", csv, dest).exit_code == 0
    assert validate(dest) == []
    imported = archive.load(dest)
    assert (imported["setup_id"] == "ds").all() and imported["repetition"].max() == 9
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[1], "12.5", 1)
    csv.write_text("\n".join(lines) + "\n")
    result = run(kavier_cli, "calibrate", "--dataset", csv, "--output-folder", tmp_path / "c")
    assert result.exit_code == 2
    assert "mine.csv: line 4: field 'n_input_tokens': expected an integer" in result.output
    (tmp_path / "few.csv").write_text("sweep,latency_s\nprefill,1.0\n")
    result = run(archive_cli, "import", "measurements", tmp_path / "few.csv", tmp_path / "f")
    assert result.exit_code == 2 and "missing required column(s)" in result.output


def test_validate_flags_infinite_latencies_and_carbon_intensity(tmp_path):
    # NaN and negative values were flagged; infinity passed the "> 0" and ">= 0" checks
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, column, row, message in (
            ("a10-surf-vllm-llama3-8b", "latency_s", 2,
             "non-positive or infinite latency_s (and no error) (rows 3)"),
            ("carbon-intensity-entsoe-2022", "carbon_intensity", 7,
             "negative, missing or infinite carbon_intensity (rows 8)")):
        src = archive.dataset_dir(name)
        dest = tmp_path / name
        shutil.copytree(src, dest)
        meta = json.loads((src / "dataset.json").read_text())
        tables = [f for f in meta["files"] if f.endswith(".parquet")]
        path = dest / (meta["main_table"] if meta["main_table"] in tables else tables[0])
        table = pq.read_table(path)
        values = table.column(column).to_pylist()
        values[row] = float("inf")
        index = table.schema.get_field_index(column)
        pq.write_table(table.set_column(index, table.schema.field(index),
                                        pa.array(values, table.schema.field(index).type)), path)
        assert any(message in p for p in validate(dest)), validate(dest)
