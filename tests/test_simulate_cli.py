"""``kavier simulate`` end to end: prefix caching, KV memory, OpenDC export, bad input."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from archive.datasets import dataset_dir
from kavier.cli import main
from kavier.opendc import FRAGMENTS_SCHEMA, TASKS_SCHEMA


def run(*args):
    return CliRunner().invoke(main, list(args))


def reference_block_reuse(path, block_size=512):
    """Leading-run block reuse with an unlimited cache, straight from the JSONL."""
    seen, looked_up, hit = set(), 0, 0
    for line in path.read_text().splitlines():
        req = json.loads(line)
        ids = req["hash_ids"][:req["input_length"] // block_size]
        prefixes = [tuple(ids[:k + 1]) for k in range(len(ids))]
        matched = 0
        while matched < len(prefixes) and prefixes[matched] in seen:
            matched += 1
        looked_up, hit = looked_up + len(ids), hit + matched
        seen.update(prefixes)
    return hit / looked_up


def test_mooncake_block_reuse_matches_a_reference(tmp_path):
    out = tmp_path / "sim"
    result = run("simulate", "--trace", "mooncake-fast25-conversation", "--gpu", "H100-SXM",
                 "--prefix-cache-policy", "blocks", "--cache-blocks", "unlimited",
                 "--export-rate", "0", "--output-folder", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    cache = summary["prefix_cache"]
    expected = reference_block_reuse(
        dataset_dir("mooncake-fast25-conversation") / "conversation_trace.jsonl")
    assert cache["block_hit_ratio"] == pytest.approx(expected, rel=1e-12)
    assert 0.3 < expected < 0.45 and cache["evictions"] == 0
    req = pd.read_parquet(out / "requests.parquet")
    assert req["n_cached_tokens"].sum() == cache["reused_tokens"]
    assert cache["token_reuse_ratio"] == pytest.approx(
        req["n_cached_tokens"].sum() / req["n_input_tokens"].sum())
    assert summary["prefill_saved_gpu_hours"] > 0
    assert pq.read_schema(out / "opendc" / "tasks.parquet").equals(TASKS_SCHEMA)
    assert pq.read_schema(out / "opendc" / "fragments.parquet").equals(FRAGMENTS_SCHEMA)
    assert "token reuse ratio" in result.output


def test_gpu_memory_bounds_the_block_pool(tmp_path):
    out = tmp_path / "sim"
    result = run("simulate", "--trace", "mooncake-fast25-conversation", "--gpu", "A10",
                 "--prefix-cache-policy", "blocks", "--no-fragments", "--no-opendc",
                 "--output-folder", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prefix_cache"]["capacity_blocks"] == 106   # (0.9·24 GiB − 16 GB) / 64 MiB
    assert summary["prefix_cache"]["evictions"] > 0
    req = pd.read_parquet(out / "requests.parquet")
    assert (~req["kv_fits"]).sum() == summary["requests_kv_not_fitting"] > 0
    assert req.loc[~req["kv_fits"], "n_input_tokens"].min() > 40_000
    assert not (out / "fragments.parquet").exists() and not (out / "opendc").exists()


def marconi_csv(path):
    """A Marconi-layout CSV (thesis Table 6.4) whose token lists are JSON strings."""
    system = list(range(1, 21))
    rows = [(0, 0, 0.0, system + [101, 102]), (1, 0, 4.0, system + [201]),
            (0, 1, 9.0, system + [101, 102, 103]), (1, 1, 12.0, list(range(50, 60)))]
    pd.DataFrame({
        "session_id": [r[0] for r in rows], "turn_id": [r[1] for r in rows],
        "ts": [r[2] for r in rows], "num_in_t": [len(r[3]) for r in rows],
        "num_out_t": [5, 6, 7, 8], "input_tokens": [json.dumps(r[3]) for r in rows],
        "output_tokens": ["[1]"] * 4}).to_csv(path, index=False)


@pytest.mark.parametrize("scope,policy,hits", [("global", "prefill", 2), ("session", "prefill", 1),
                                               ("global", "full", 2)])
def test_exact_match_on_a_marconi_csv(tmp_path, scope, policy, hits):
    trace = tmp_path / "marconi.csv"
    marconi_csv(trace)
    out = tmp_path / "sim"
    result = run("simulate", "--trace", str(trace), "--prefix-cache-policy", policy,
                 "--prefix-cache-min-tokens", "20", "--cache-scope", scope,
                 "--output-folder", str(out))
    assert result.exit_code == 0, result.output
    cache = json.loads((out / "summary.json").read_text())["prefix_cache"]
    assert (cache["lookups"], cache["hits"]) == (3, hits)
    assert cache["hit_ratio_requests"] == hits / 4
    req = pd.read_parquet(out / "requests.parquet")
    assert (req.loc[req["cache_hit"], "prefill_s"] == 0).all()
    tasks = pd.read_parquet(out / "opendc" / "tasks.parquet")
    if policy == "full":    # answered from the cache: no GPU work, no OpenDC task
        assert (req.loc[req["cache_hit"], "decode_s"] == 0).all()
        assert len(tasks) == 4 - hits
    else:
        assert len(tasks) == 4


@pytest.mark.parametrize("name,content,args,message", [
    ("t.csv", 'num_input_tokens,num_output_tokens,input_tokens\n2,1,"[1, 2]"\n2,1,"[1, 2"\n',
     ["--prefix-cache-policy", "prefill"], "line 3: field 'input_tokens'"),
    ("t.csv", 'num_input_tokens,num_output_tokens,input_tokens\n3,1,"[1, 2]"\n',
     [], "line 2: field 'input_tokens': 2 token ids for 3 input tokens"),
    ("t.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": 7}\n',
     [], "line 1: field 'hash_ids': expected a list"),
    ("t.csv", "num_input_tokens,num_output_tokens\n5,3\n", ["--prefix-cache-policy", "blocks"],
     "needs the prompts' content"),
    ("t.csv", 'num_input_tokens,num_output_tokens,input_tokens\n2,1,"[1, 2]"\n',
     ["--prefix-cache-policy", "blocks", "--block-size", "0"], "block size must be > 0"),
    ("t.csv", 'num_input_tokens,num_output_tokens,input_tokens\n2,1,"[1, 2]"\n',
     ["--prefix-cache-policy", "prefill", "--cache-scope", "session"], "session_id"),
    ("t.csv", "num_input_tokens,num_output_tokens\n5,3\n", ["--start-time", "not-a-time"],
     "ISO 8601"),
])
def test_bad_content_is_one_line_and_nothing_complete(tmp_path, name, content, args, message):
    trace = tmp_path / name
    trace.write_text(content)
    out = tmp_path / "out"
    result = run("simulate", "--trace", str(trace), "--output-folder", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (out / "summary.json").exists() and not list(out.glob("**/*.partial"))


def test_a_rerun_removes_stale_outputs(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("num_input_tokens,num_output_tokens\n5,3\n")
    out = tmp_path / "out"
    assert run("simulate", "--trace", str(trace), "--output-folder", str(out)).exit_code == 0
    assert (out / "opendc" / "tasks.parquet").exists()
    assert run("simulate", "--trace", str(trace), "--output-folder", str(out),
               "--no-opendc", "--no-fragments").exit_code == 0
    assert not (out / "opendc" / "tasks.parquet").exists()
    assert not (out / "fragments.parquet").exists()
    rows = json.loads((out / "summary.json").read_text())["rows_written"]
    assert rows == {"requests.parquet": 1}


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_simulate_of_a_parquet_or_csv_trace_never_imports_pandas(tmp_path, suffix):
    """pandas' import is a quarter of the whole command at 100,000 requests (see
    ``archive.arrow``); this keeps the fast path free of it."""
    import subprocess
    import sys

    script = """
import sys
from kavier.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("pandas imported:", "pandas" in sys.modules)
"""
    trace = dataset_dir("azure-llm-inference-2023-conv") / "workload.parquet"
    if suffix == ".csv":
        csv = tmp_path / "trace.csv"
        columns = ["arrival_s", "n_input_tokens", "n_output_tokens"]
        pd.read_parquet(trace, columns=columns).to_csv(csv, index=False)
        trace = csv
    out = subprocess.run([sys.executable, "-c", script, "simulate", "--trace", str(trace),
                          "--export-rate", "1", "--output-folder", str(tmp_path / "sim")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("pandas imported: False"), out.stdout + out.stderr
    assert pd.read_parquet(tmp_path / "sim" / "requests.parquet").shape[0] == 19_366
