import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kavier.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal")
    result = run("calibrate", "--output-folder", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_calibrate_writes_profile_and_report(profile_dir):
    for name in ("profile.json", "points.csv", "medians.csv", "validation.png",
                 "validation.pdf", "report.md", "summary.json"):
        assert (profile_dir / name).stat().st_size > 0
    profile = json.loads((profile_dir / "profile.json").read_text())
    assert (profile["gpu"], profile["llm"], profile["engine"]) == ("A10", "Llama-3-8B",
                                                                   "vLLM 0.9.0")
    assert len(profile["data_sha256"]) == 64 and profile["toolkit_version"]
    assert profile["mape_pct"]["heldout"]["prefill"]["per_size_median"] <= 5
    assert not list(profile_dir.glob("*.partial"))


def test_simulate_with_profile_on_azure(profile_dir, tmp_path):
    out = tmp_path / "sim"
    result = run("simulate", "--trace", "azure-llm-inference-2023-conv", "--profile",
                 str(profile_dir / "profile.json"), "--output-folder", str(out),
                 "--export-rate", "1", "--steps")
    assert result.exit_code == 0, result.output
    assert "GPU-hours" in result.output and "E2E p50" in result.output
    req = pd.read_parquet(out / "requests.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert len(req) == summary["n_requests"] == 19366
    assert summary["timing_model"] == "roofline" and summary["engine_path"] == "compiled"
    steps = pd.read_parquet(out / "steps.parquet")
    assert summary["gpu_hours"] == pytest.approx(steps["duration_s"].sum() / 3600)
    frag = pd.read_parquet(out / "fragments.parquet")
    assert frag["duration_s"].sum() == pytest.approx(summary["timeline_s"])
    assert (req["ttft_s"] <= req["e2e_s"]).all() and (req["queue_s"] >= -1e-9).all()


def test_fragment_totals_do_not_depend_on_export_rate(tmp_path):
    trace = tmp_path / "t.csv"
    pd.DataFrame({"num_input_tokens": [100, 2000, 5], "num_output_tokens": [50, 1, 300]}
                 ).to_csv(trace, index=False)
    totals = []
    for rate in ("0.1", "0.01", "0"):
        out = tmp_path / f"r{rate}"
        result = run("simulate", "--trace", str(trace), "--output-folder", str(out),
                     "--export-rate", rate)
        assert result.exit_code == 0, result.output
        frag = pd.read_parquet(out / "fragments.parquet")
        summary = json.loads((out / "summary.json").read_text())
        totals.append((frag["duration_s"].sum(), frag["energy_wh"].sum()))
        if rate != "0":
            assert len(frag) == np.ceil(summary["timeline_s"] / float(rate) - 1e-9)
    assert np.allclose(totals[0], totals[1], rtol=1e-9)
    assert np.allclose(totals[0], totals[2], rtol=1e-9)


@pytest.mark.parametrize("content,args,message", [
    ("a,b\n1,2\n", [], "missing token columns"),
    ("num_input_tokens,num_output_tokens\n5,3\n-4,2\n", [], "line 3: field 'num_input_tokens'"),
    ("num_input_tokens,num_output_tokens\n5,3\n", ["--llm", "GPT-9"], "known: Llama-3-8B"),
    ("num_input_tokens,num_output_tokens\n5,3\n", ["--gpu", "Z1"], "known: A10"),
    ("num_input_tokens,num_output_tokens\n5,3\n", ["--profile", "nope.json"], "no such profile"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, content, args, message):
    trace = tmp_path / "t.csv"
    trace.write_text(content)
    out = tmp_path / "out"
    result = run("simulate", "--trace", str(trace), "--output-folder", str(out), *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (out / "summary.json").exists()


def test_negative_export_rate_and_unreadable_dataset_are_rejected(tmp_path):
    result = run("simulate", "--trace", "x.csv", "--export-rate", "-1")
    assert result.exit_code == 2 and "export-rate" in result.output
    result = run("calibrate", "--dataset", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "no such file or bundled dataset" in result.output


def test_console_script_prints_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kavier", "simulate", "--trace",
                           str(tmp_path / "absent.csv")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("cell", ["inf", "1e23", "9223372036854775808", "100000001", "nan"])
def test_out_of_range_token_counts_are_rejected(tmp_path, cell):
    trace = tmp_path / "t.csv"
    trace.write_text(f"num_input_tokens,num_output_tokens\n5,3\n{cell},2\n")
    result = run("simulate", "--trace", str(trace), "--output-folder", str(tmp_path / "o"),
                 "--no-fragments", "--no-opendc")
    assert result.exit_code == 2, result.output
    assert "line 3: field 'num_input_tokens'" in result.output and "Traceback" not in (
        result.output)
    assert not (tmp_path / "o" / "summary.json").exists()


def test_unsigned_parquet_overflow_and_infinite_arrival_are_rejected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"n_input_tokens": pa.array([5, 2**64 - 1], pa.uint64()),
                             "n_output_tokens": pa.array([3, 3], pa.uint64())}),
                   tmp_path / "u.parquet")
    result = run("simulate", "--trace", str(tmp_path / "u.parquet"), "--output-folder",
                 str(tmp_path / "o"))
    assert result.exit_code == 2 and "18446744073709551615" in result.output, result.output
    pq.write_table(pa.table({"n_input_tokens": [5, 6], "n_output_tokens": [3, 3],
                             "arrival_s": [0.0, float("inf")]}), tmp_path / "a.parquet")
    result = run("simulate", "--trace", str(tmp_path / "a.parquet"), "--output-folder",
                 str(tmp_path / "o"))
    assert result.exit_code == 2 and "field 'arrival_s'" in result.output, result.output


def test_a_second_writer_into_one_folder_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom kavier.export.output import run_folder\n"
        f"with run_folder({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        trace = tmp_path / "t.csv"
        trace.write_text("num_input_tokens,num_output_tokens\n5,3\n")
        result = run("simulate", "--trace", str(trace), "--output-folder", str(out))
        assert result.exit_code == 2 and "another run is writing" in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not (out / "summary.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:          # the kernel drops a dead process's lock
        result = run("simulate", "--trace", str(trace), "--output-folder", str(out))
        if result.exit_code == 0:
            break
    assert result.exit_code == 0, result.output
    assert (out / "summary.json").exists()


def test_an_output_folder_under_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    trace = tmp_path / "t.csv"
    trace.write_text("num_input_tokens,num_output_tokens\n5,3\n")
    result = run("simulate", "--trace", str(trace), "--output-folder", str(tmp_path / "f" / "o"))
    assert result.exit_code == 2 and "cannot create the output folder" in result.output


@pytest.mark.parametrize("obstacle", ["file-for-folder", "folder-for-file", "full-disk"])
def test_writing_errors_inside_the_output_folder_are_one_line(tmp_path, obstacle):
    import os

    trace = tmp_path / "t.csv"
    trace.write_text("num_input_tokens,num_output_tokens\n5,3\n")
    out = tmp_path / "o"
    out.mkdir()
    if obstacle == "file-for-folder":
        (out / "opendc").write_text("x")
        expect = "opendc/tasks.parquet: Not a directory"
    elif obstacle == "folder-for-file":
        (out / "summary.json").mkdir()
        expect = "summary.json: Is a directory"
    else:                             # /dev/full fails every write with ENOSPC
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full")
        (out / "requests.parquet.partial").symlink_to("/dev/full")
        expect = "No space left on device"
    result = CliRunner().invoke(main, ["simulate", "--trace", str(trace), "--output-folder",
                                       str(out)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert expect in result.output and len(result.output.strip().splitlines()) == 1
    assert not (out / "summary.json").is_file()


@pytest.mark.parametrize("name,content,message", [
    ("dup.csv", "num_input_tokens,num_input_tokens,num_output_tokens\n5,6,3\n",
     "field 'num_input_tokens': column appears 2 times"),
    ("bad.jsonl", '{"n_input_tokens": 5, "n_output_tokens": 3}\n{"n_input_tokens": 5,\n',
     "bad.jsonl: line 2: not JSON"),
    ("list.jsonl", '{"n_input_tokens": 5, "n_output_tokens": 3}\n[1, 2]\n',
     "line 2: expected one JSON object per line"),
])
def test_malformed_traces_are_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    result = run("simulate", "--trace", str(tmp_path / name), "--output-folder",
                 str(tmp_path / "o"))
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("field,value", [("memory_efficiency", "fast"),
                                         ("memory_efficiency", 0), ("compute_efficiency", 1.5),
                                         ("request_overhead_s", -1.0),
                                         ("prefill_sharpness", 0.5)])
def test_profiles_with_unphysical_parameters_are_one_line(profile_dir, tmp_path, field, value):
    profile = json.loads((profile_dir / "profile.json").read_text())
    profile["params"][field] = value
    (tmp_path / "p.json").write_text(json.dumps(profile))
    (tmp_path / "t.csv").write_text("num_input_tokens,num_output_tokens\n5,3\n")
    result = run("simulate", "--trace", str(tmp_path / "t.csv"), "--profile",
                 str(tmp_path / "p.json"), "--output-folder", str(tmp_path / "o"))
    assert result.exit_code == 2 and f"field 'params.{field}'" in result.output, result.output


def test_a_profile_from_an_older_roofline_runs_with_a_warning(profile_dir, tmp_path):
    profile = json.loads((profile_dir / "profile.json").read_text())
    del profile["timing_revision"]
    (tmp_path / "p.json").write_text(json.dumps(profile))
    (tmp_path / "t.csv").write_text("num_input_tokens,num_output_tokens\n5,3\n")
    args = ["--trace", str(tmp_path / "t.csv"), "--output-folder", str(tmp_path / "o")]
    old = run("simulate", *args, "--profile", str(tmp_path / "p.json"))
    assert old.exit_code == 0 and "warning: profile" in old.output and "refit" in old.output
    current = run("simulate", *args, "--profile", str(profile_dir / "profile.json"))
    assert current.exit_code == 0 and "warning" not in current.output


def test_a_broken_dataset_card_is_one_line(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text("{bad")
    result = run("simulate", "--trace", str(tmp_path / "ds"), "--output-folder",
                 str(tmp_path / "o"))
    assert result.exit_code == 2 and "dataset.json: not valid JSON" in result.output


def readme_main_job() -> list[list[str]]:
    """The ``kavier`` commands of the README's first command, as argument lists."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    line = text.split("```bash", 1)[1].split("# 1.", 1)[1].splitlines()[1]
    return [shlex.split(c)[1:] for c in line.split(" && ") if c.startswith("kavier ")]


def test_readme_main_job_keeps_up_conserves_and_names_its_offered_load(tmp_path, monkeypatch,
                                                                       llama8b, a10):
    monkeypatch.chdir(tmp_path)
    outputs = []
    for args in readme_main_job():
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)
        outputs.append(result.output)
    assert len(outputs) == 3          # calibrate, the batched run, the one-at-a-time run
    batched = json.loads((tmp_path / "runs/simulation/summary.json").read_text())
    alone = json.loads((tmp_path / "runs/one-at-a-time/summary.json").read_text())
    # the batched run keeps up, and says so with a number; one at a time is the thesis's 54x
    assert "offered load" in outputs[1] and "within capacity" in outputs[1]
    assert batched["offered_load"] < 1 and not batched["backlog"]
    assert alone["offered_load"] > 50 and alone["backlog"] and "BACKLOG" in outputs[2]
    for s, folder in ((batched, "simulation"), (alone, "one-at-a-time")):
        req = pd.read_parquet(tmp_path / "runs" / folder / "requests.parquet")
        frag = pd.read_parquet(tmp_path / "runs" / folder / "fragments.parquet")
        energy = s["sustainability"]
        assert s["gpu_hours"] == pytest.approx(s["prefill_gpu_hours"] + s["decode_gpu_hours"])
        assert s["gpu_hours"] <= s["provisioned_gpu_hours"] * (1 + 1e-12)
        assert s["output_throughput_tok_s"] * s["makespan_s"] == pytest.approx(
            s["n_output_tokens"]) and req["n_output_tokens"].sum() == s["n_output_tokens"]
        assert frag["energy_wh"].sum() == pytest.approx(energy["energy_gpu_wh"], rel=1e-9)
        assert frag["duration_s"].sum() == pytest.approx(s["timeline_s"] * s["replicas"])
        provisioned_s = s["provisioned_gpu_hours"] * 3600
        assert energy["energy_gpu_j"] / provisioned_s <= energy["power_model"]["max_w"]
        # no token faster than streaming the weights once at peak bandwidth
        floor = llama8b.weight_bytes / a10.bytes_per_s
        assert req["tpot_s"].dropna().min() >= floor
    assert alone["service_demand_s"] == pytest.approx(alone["gpu_hours"] * 3600, rel=1e-6)


def test_opendc_tasks_carry_weights_and_kv_pool_in_kb_and_no_file_needs_parquet_mr_1_14(
        tmp_path, llama8b):
    import pyarrow.parquet as pq

    out = tmp_path / "o"
    trace = tmp_path / "t.csv"
    pd.DataFrame({"num_input_tokens": [100, 2000], "num_output_tokens": [50, 3]}
                 ).to_csv(trace, index=False)
    result = run("simulate", "--trace", str(trace), "--output-folder", str(out), "--replicas",
                 "2", "--steps")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    tasks = pd.read_parquet(out / "opendc" / "tasks.parquet")
    pool = summary["kv_pool_blocks"] * summary["block_size"] * llama8b.kv_bytes_per_token
    # OpenDC's TaskColumns.kt: mem_capacity in KB; its loaders divide by 1000 to get MB
    assert (tasks["mem_capacity"] == np.ceil((llama8b.weight_bytes + pool) / 1000)).all()
    assert list(tasks["id"]) == [0, 1]
    for path in out.rglob("*.parquet"):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                if col.physical_type in ("INT32", "INT64"):
                    assert "BYTE_STREAM_SPLIT" not in col.encodings, (path, col.path_in_schema)


def test_opendc_fragments_are_the_same_whatever_the_fragment_export(tmp_path):
    trace = tmp_path / "t.csv"
    pd.DataFrame({"num_input_tokens": [100, 2000, 40, 700],
                  "num_output_tokens": [50, 3, 200, 20],
                  "arrival_s": [0.0, 0.5, 9.0, 9.1]}).to_csv(trace, index=False)
    tables = {}
    for name, extra in (("shared", ["--export-rate", "0"]), ("own", ["--export-rate", "0.1"]),
                        ("alone", ["--no-fragments"])):
        out = tmp_path / name
        result = run("simulate", "--trace", str(trace), "--output-folder", str(out),
                     "--replicas", "2", "--carbon-trace", "NL", "--start", "2022-07-01T00:00Z",
                     *extra)
        assert result.exit_code == 0, result.output
        tables[name] = pd.read_parquet(out / "opendc" / "fragments.parquet")
        assert (out / "opendc" / "tasks.parquet").exists()
    assert len(tables["shared"]) > 8 and (tables["shared"]["gpu_usage"] > 0).any()
    pd.testing.assert_frame_equal(tables["shared"], tables["own"])
    pd.testing.assert_frame_equal(tables["shared"], tables["alone"])
    shared = pd.read_parquet(tmp_path / "shared" / "fragments.parquet")
    assert "co2_g" in shared and shared["co2_g"].sum() > 0      # the fragments keep their CO2


def test_fragment_row_guard_refuses_before_and_during_a_run_unless_forced(tmp_path,
                                                                         monkeypatch):
    import kavier.cli

    trace = tmp_path / "t.csv"
    pd.DataFrame({"num_input_tokens": [100, 2000, 50], "num_output_tokens": [400, 3, 300]}
                 ).to_csv(trace, index=False)
    monkeypatch.setattr(kavier.cli, "ROW_LIMIT", 40)
    out = tmp_path / "o"
    # before the run: 1 ms rows over the work's ≥ 40 ms of GPU time
    result = run("simulate", "--trace", str(trace), "--output-folder", str(out),
                 "--export-rate", "0.001")
    assert result.exit_code == 2 and "past the limit of 40" in result.output, result.output
    assert "--force" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (out / "summary.json").exists()
    result = run("simulate", "--trace", str(trace), "--output-folder", str(out),
                 "--export-rate", "0.001", "--force")
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(out / "fragments.parquet")) > 40
    # during the run: OpenDC's run-length rows have no estimate; the writer stops at the limit
    monkeypatch.setattr(kavier.cli, "ROW_LIMIT", 2)
    result = run("simulate", "--trace", str(trace), "--output-folder", str(out),
                 "--no-fragments")
    assert result.exit_code == 2 and "opendc/fragments.parquet would hold" in result.output
    assert not (out / "summary.json").exists()
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("*.partial"))


def test_sigkill_at_any_point_leaves_no_summary_and_a_finished_run_matches_its_files(tmp_path):
    import signal
    import time

    import pyarrow.parquet as pq

    out = tmp_path / "run"
    args = [sys.executable, "-m", "kavier", "simulate", "--trace",
            "azure-llm-inference-2023-conv", "--max-num-seqs", "1", "--output-folder", str(out)]
    start = time.monotonic()
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    full_s = time.monotonic() - start

    def finished_and_consistent() -> bool:
        if not (out / "summary.json").exists():
            return False
        rows = json.loads((out / "summary.json").read_text())["rows_written"]
        files = {str(p.relative_to(out)) for p in out.rglob("*.parquet")}
        assert files == set(rows)
        assert all(pq.ParquetFile(out / f).metadata.num_rows == n for f, n in rows.items())
        return True

    assert finished_and_consistent()
    killed_in_run = 0
    for share in (0.05, 0.25, 0.45, 0.65, 0.85):      # kills spread over the whole run
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(share * full_s)
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=60)
        if code == 0:
            assert finished_and_consistent()
        elif (out / "summary.json").exists():
            # killed before it took the folder (importing, reading the trace): the earlier
            # run is untouched; or after its summary was written (while the interpreter
            # exited): a finished run. Either way the summary describes exactly its files
            assert finished_and_consistent()
        else:
            killed_in_run += 1                # killed inside the run: no summary at all
    assert killed_in_run >= 1
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    assert finished_and_consistent()
