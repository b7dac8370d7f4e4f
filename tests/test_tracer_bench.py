"""``tracer bench``: load against a real HTTP server on loopback, written as a serving run
that ``kavier calibrate`` takes."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from archive.serving import read_serving
from archive.validate import validate
from tracer.cli import main as tracer_cli
from tracer.workloads import poisson_schedule

MODEL = "Llama-3-8B"


@pytest.fixture()
def engine(tmp_path):
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"gpu": "A10", "max_num_seqs": 8, "max_num_batched_tokens": 2048,
                                "llm": "Llama-3-8B"}))
    return path


def test_poisson_schedule_has_the_rate_and_burstiness():
    s = poisson_schedule(4000, 10.0, 100, 20, burstiness=1.0, seed=1)
    gaps = np.diff(s.offset_s)
    assert s.offset_s[0] == 0 and abs(gaps.mean() - 0.1) < 0.005
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05             # exponential: CV 1
    bursty = np.diff(poisson_schedule(4000, 10.0, 100, 20, burstiness=0.25, seed=1).offset_s)
    assert abs(bursty.std() / bursty.mean() - 2.0) < 0.15          # gamma(k): CV 1/sqrt(k)
    assert (poisson_schedule(5, float("inf"), 10, 2).offset_s == 0).all()


def test_bench_writes_a_serving_run_that_calibrates(server, engine, tmp_path):
    state, url = server
    out = tmp_path / "run"
    result = CliRunner().invoke(tracer_cli, [
        "bench", "--url", url, "--output", str(out), "--engine", str(engine),
        "--request-rate", "40", "--num-prompts", "24", "--input-len", "64",
        "--output-len", "6", "--max-concurrency", "4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "24 of 24 requests succeeded" in result.output and "TTFT" in result.output
    assert validate(out) == []
    run = read_serving(out)
    r = run.requests
    assert len(r) == 24 and r["error"].isna().all() and (r["n_output_tokens"] == 6).all()
    assert (r["n_input_tokens"] == 64).all()
    assert all(len(x) == 5 for x in r["itl_s"])
    planned = poisson_schedule(24, 40.0, 64, 6, seed=3).offset_s
    # sent on schedule: never early, and late only by a stall of the (loaded, 2-core) test
    # machine, which delayed the last two of 24 by 0.24 s once in CI
    late = r["arrival_s"].to_numpy() - planned
    assert late.min() > -0.005 and np.mean(late < 0.05) >= 0.9, late
    decode = state.timing.decode_per_token_s
    assert r["tpot_s"].median() == pytest.approx(decode, rel=0.5)
    assert run.engine["timestamps"] == "client" and run.engine["version"] == "0.0.0-fake"
    assert run.engine["max_model_len"] == 8192 and run.engine["cache_salt"] == "per request"
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 24                                        # warm-up not recorded
    from kavier.cli import main as kavier_cli

    cal = CliRunner().invoke(kavier_cli, [
        "calibrate", "--dataset", str(out), "--fit", "request_overhead_s,compute_efficiency",
        "--max-evaluations", "8", "--output-folder", str(tmp_path / "cal")])
    assert cal.exit_code == 0, cal.output
    itl = json.loads((tmp_path / "cal" / "scores.json").read_text())["itl"]
    gaps = np.concatenate([np.asarray(x) for x in r["itl_s"]])
    assert itl["measured_s"]["mean"] == pytest.approx(gaps.mean(), rel=1e-9)
    assert itl["measured_s"]["p99"] == pytest.approx(np.percentile(gaps, 99))
    assert itl["predicted_s"]["p50"] > 0 and itl["error_pct"]["p90"] is not None
    again = CliRunner().invoke(tracer_cli, [
        "bench", "--url", url, "--output", str(out), "--engine", str(engine),
        "--num-prompts", "2"])
    assert again.exit_code == 2 and "holds a run already; pass --resume" in again.output


def test_bench_failures_exit_non_zero_and_options_are_checked(server, engine, tmp_path):
    state, url = server
    args = ["bench", "--url", url, "--engine", str(engine), "--num-prompts", "5",
            "--input-len", "16", "--output-len", "3", "--request-rate", "inf"]
    state.fail_next = 1                      # a failed warm-up stops the run, it never vanishes
    warm = CliRunner().invoke(tracer_cli, [*args, "--output", str(tmp_path / "w")])
    assert warm.exit_code == 2 and "the warm-up request failed" in warm.output, warm.output
    assert "plan: 5 requests, 80 prompt + 15 output tokens" in warm.output
    state.fail_next = 2
    failed = CliRunner().invoke(tracer_cli, [*args, "--output", str(tmp_path / "f"),
                                             "--warmup", "0"])
    assert failed.exit_code == 1 and "failed: 2 ×" in failed.output
    rows = read_serving(tmp_path / "f").requests
    assert rows["error"].notna().sum() == 2
    state.fail_next = 1
    allowed = CliRunner().invoke(tracer_cli, [*args, "--output", str(tmp_path / "a"),
                                              "--allow-failures", "--warmup", "0"])
    assert allowed.exit_code == 0, allowed.output
    bad = CliRunner().invoke(tracer_cli, ["bench", "--url", url, "--engine", str(engine),
                                          "--output", str(tmp_path / "b"), "--trace",
                                          "azure-llm-inference-2023-conv", "--input-len", "9"])
    assert bad.exit_code == 2 and "--input-len has no effect with --trace" in bad.output
    long = CliRunner().invoke(tracer_cli, [*args[:-6], "--input-len", "9000", "--output",
                                           str(tmp_path / "l")])
    assert long.exit_code == 2 and "max_model_len" in long.output


def test_requests_in_flight_when_the_server_dies_are_recorded_as_failed(server, engine,
                                                                        tmp_path):
    state, url = server
    out = tmp_path / "dead"
    state.die_after = 2                           # every stream is cut after two tokens
    result = CliRunner().invoke(tracer_cli, [
        "bench", "--url", url, "--output", str(out), "--engine", str(engine), "--warmup", "0",
        "--num-prompts", "4", "--input-len", "8", "--output-len", "6", "--request-rate", "inf"])
    assert result.exit_code == 1 and "4 × connection lost mid-stream" in result.output, \
        result.output
    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(r["error"].startswith("connection lost") for r in lines)
    assert all(r["ttft_s"] > 0 for r in lines)          # what was measured is kept


def test_bench_replays_a_trace(server, engine, tmp_path):
    _, url = server
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,n_input_tokens,n_output_tokens\n"
                     "10.0,40,3\n10.5,80,0\n11.0,20,2\n14.0,60,5\n")
    out = tmp_path / "replay"
    result = CliRunner().invoke(tracer_cli, [
        "bench", "--url", url, "--output", str(out), "--engine", str(engine), "--trace",
        str(trace), "--rate-scale", "10", "--num-prompts", "3"])
    assert result.exit_code == 0, result.output
    # vLLM needs max_tokens >= 1: the 0-token row is sent for one token, and said so
    assert "1 request of the trace with 0 output tokens sent with max_tokens 1" in (
        result.stderr)
    r = read_serving(out).requests
    assert r["n_input_tokens"].tolist() == [40, 80, 20]
    assert r["n_output_tokens"].tolist() == [3, 1, 2]
    assert np.allclose(r["arrival_s"], [0.0, 0.05, 0.1], atol=0.03)


def test_bench_samples_the_gpu_from_before_the_first_request_to_after_the_last(
        server, engine, tmp_path, monkeypatch):
    from datetime import datetime

    from sshd import write_fake_smi

    write_fake_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    out = tmp_path / "sampled"
    result = CliRunner().invoke(tracer_cli, [
        "bench", "--url", server[1], "--output", str(out), "--engine", str(engine),
        "--num-prompts", "12", "--input-len", "32", "--output-len", "8", "--request-rate",
        "30", "--local-smi", "--loop-ms", "20"])
    assert result.exit_code == 0, result.output
    assert validate(out) == []
    card = json.loads((out / "dataset.json").read_text())
    assert {"gpu_samples.parquet", "gpu_samples.jsonl"} <= set(card["files"])
    gpu = pd.read_parquet(out / "gpu_samples.parquet")
    sent = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    first_send = datetime.fromtimestamp(min(r["send_unix_s"] for r in sent))
    last_end = datetime.fromtimestamp(max(r["send_unix_s"] + r["ttft_s"] + sum(r["itl_s"])
                                          for r in sent))
    assert gpu["timestamp"].min() <= first_send and gpu["timestamp"].max() >= last_end - \
        pd.Timedelta(seconds=0.05)
    assert set(gpu["gpu_index"]) == {0} and gpu["power_w"].notna().all()
    rejected = CliRunner().invoke(tracer_cli, [
        "bench", "--url", server[1], "--output", str(tmp_path / "x"), "--engine", str(engine),
        "--gpu-index", "1"])
    assert rejected.exit_code == 2 and "--gpu-index has no effect without --ssh" in \
        rejected.output


def test_a_rate_run_achieves_the_requested_arrival_process(engine, tmp_path):
    """Sent, not just planned: the send times the run recorded have the requested mean rate
    (within 5 %) and a Poisson process's coefficient of variation of 1 (within 10 %). Server
    and client run in processes of their own, as they do for real: in the test process the
    client shares its GIL with whatever threads earlier tests left (a full run measured a CV
    of 2.9 that way)."""
    import subprocess
    import sys

    from fake_vllm import FakeTiming, start_process

    process, url = start_process(FakeTiming(0.004, 2e-6, 0.002))
    out = tmp_path / "rate"
    try:
        result = subprocess.run([
            sys.executable, "-c", "from tracer.cli import main; main()", "bench", "--url", url,
            "--output", str(out), "--engine", str(engine), "--num-prompts", "600",
            "--input-len", "8", "--output-len", "2", "--request-rate", "100", "--seed", "11",
            "--warmup", "0"], capture_output=True, text=True, timeout=120)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert result.returncode == 0, result.stderr
    sent = np.sort([json.loads(x)["start_s"]
                    for x in (out / "requests.jsonl").read_text().splitlines()])
    gaps = np.diff(sent)
    assert 1.0 / gaps.mean() == pytest.approx(100.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.10)


def test_stages_step_the_rate_and_label_their_requests():
    from tracer.workloads import parse_stages, stages_schedule

    s = stages_schedule(parse_stages("20:200,50:200"), 64, 8, seed=2)
    for k, rate in enumerate((20.0, 50.0)):
        times = s.offset_s[s.stage == k]
        assert times.size / 200.0 == pytest.approx(rate, rel=0.05)      # 4,000 and 10,000
        gaps = np.diff(times)
        assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.10)
    assert np.all(np.diff(s.offset_s) >= 0) and s.offset_s[0] == 0
    counted = stages_schedule(parse_stages("10:300req,40:30s,5:7req"), 64, 8, seed=2)
    assert [int((counted.stage == k).sum()) for k in (0, 2)] == [300, 7]
    first = counted.offset_s[counted.stage == 1]
    end0 = counted.offset_s[counted.stage == 0].max()
    assert first.min() >= end0 and first.max() < end0 + 30               # after the count
    assert first.size / 30 == pytest.approx(40, rel=0.1)
    for bad, message in (("20-50", "rate:seconds or rate:COUNTreq"),
                         ("5:2.5req", "a request count must be whole"),
                         ("5:0s", "must be positive")):
        with pytest.raises(Exception, match=message):
            parse_stages(bad)


def test_an_infinite_burstiness_is_a_constant_rate():
    s = poisson_schedule(50, 8.0, 10, 2, burstiness=float("inf"))
    assert np.allclose(np.diff(s.offset_s), 0.125) and s.offset_s[0] == 0


def test_shared_prefix_workload_shares_the_system_prompts_and_records_block_hashes(
        server, engine, tmp_path):
    state, url = server
    out = tmp_path / "shared"
    result = CliRunner().invoke(tracer_cli, [
        "bench", "--url", url, "--output", str(out), "--engine", str(engine), "--workload",
        "shared-prefix", "--prefix-groups", "2", "--prefix-len", "64", "--input-len", "16",
        "--output-len", "3", "--num-prompts", "12", "--request-rate", "inf", "--warmup", "0"])
    assert result.exit_code == 0, result.output
    assert set(state.salts) == {None}                 # the server's prefix cache may work
    rows = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert all(r["n_input_tokens"] == 80 for r in rows)
    heads = {}
    for r in rows:                                    # 64 tokens = 4 blocks of 16 shared
        heads.setdefault(r["prefix_group"], set()).add(tuple(r["hash_ids"][:4]))
    assert set(heads) == {0, 1} and all(len(h) == 1 for h in heads.values())
    assert heads[0] != heads[1]
    assert len({tuple(r["hash_ids"]) for r in rows}) == 12       # each question its own
    run = read_serving(out)
    assert run.hash_block_size == 16 and run.content() is not None
    fixed = CliRunner().invoke(tracer_cli, [
        "bench", "--url", url, "--output", str(tmp_path / "fixed"), "--engine", str(engine),
        "--num-prompts", "3", "--input-len", "16", "--output-len", "2", "--warmup", "0"])
    assert fixed.exit_code == 0, fixed.output
    assert len(set(state.salts[-3:])) == 3 and None not in state.salts[-3:]
    wrong = CliRunner().invoke(tracer_cli, [
        "bench", "--url", url, "--output", str(tmp_path / "w"), "--engine", str(engine),
        "--prefix-len", "64"])
    assert wrong.exit_code == 2 and "--prefix-len needs --workload shared-prefix" in \
        wrong.output


def test_sessions_send_each_turn_after_the_answer_with_the_conversation_so_far(
        server, engine, tmp_path):
    state, url = server
    out = tmp_path / "chat"
    result = CliRunner().invoke(tracer_cli, [
        "bench", "--url", url, "--output", str(out), "--engine", str(engine), "--workload",
        "sessions", "--num-prompts", "3", "--turns", "3", "--input-len", "16", "--output-len",
        "4", "--think-time", "0.05", "--request-rate", "inf", "--warmup", "0"])
    assert result.exit_code == 0, result.output
    assert "plan: 9 requests" in result.output
    rows = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and set(state.salts) == {None}
    for s in range(3):
        turns = sorted((r for r in rows if r["session"] == s), key=lambda r: r["turn"])
        assert [r["turn"] for r in turns] == [0, 1, 2]
        # each turn: the previous prompt, its 4-token answer (" tok" × 4 re-tokenized), a
        # new 16-token question
        assert [r["n_input_tokens"] for r in turns] == [16, 36, 56]
        for before, after in zip(turns, turns[1:], strict=False):
            ended = before["start_s"] + before["ttft_s"] + sum(before["itl_s"])
            assert after["start_s"] >= ended + 0.05          # after the answer and the pause
            k = len(before["hash_ids"]) - 1                  # full blocks of the last prompt
            assert after["hash_ids"][:k] == before["hash_ids"][:k]
    run = read_serving(out)
    assert run.hash_block_size == 16 and len(run.requests) == 9


def test_a_killed_bench_resumes_without_losing_or_repeating_a_request(engine, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from fake_vllm import FakeTiming, start_process

    process, url = start_process(FakeTiming(0.004, 2e-6, 0.01))
    out = tmp_path / "run"
    args = [sys.executable, "-c", "from tracer.cli import main; main()", "bench", "--url", url,
            "--output", str(out), "--engine", str(engine), "--num-prompts", "40",
            "--input-len", "16", "--output-len", "10", "--request-rate", "20", "--seed", "5",
            "--warmup", "0"]
    try:
        bench = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = out / "requests.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (log.exists()
                                                   and len(log.read_text().splitlines()) >= 8):
            time.sleep(0.02)
        bench.send_signal(signal.SIGKILL)
        bench.wait(timeout=10)
        with open(log, "a") as f:                        # as if killed mid-write
            f.write('{"request_id": "3')
        before = [json.loads(x) for x in log.read_text().splitlines()[:-1]]
        other = subprocess.run([*args[:-4], "--seed", "6", "--warmup", "0", "--resume"],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode == 2 and "another schedule" in other.stderr
        done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=120)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert done.returncode == 0, done.stderr
    assert "was cut off by the interruption; dropped" in done.stderr
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    ids = [int(r["request_id"]) for r in rows]
    assert 8 <= len(before) < 40 and sorted(ids) == list(range(40))    # none lost, none twice
    assert rows[:len(before)] == before                                 # kept as they were
    planned = poisson_schedule(40, 20.0, 16, 10, seed=5).offset_s
    sent = {int(r["request_id"]): r["start_s"] for r in rows}
    assert all(abs(sent[i] - planned[i]) < 0.05 for i in range(40) if i not in
               {int(r["request_id"]) for r in before})                  # on the planned timeline
    assert len(read_serving(out).requests) == 40


@pytest.mark.parametrize("args,message", [
    (["--loop-ms", "50"], "--loop-ms has no effect without --ssh, --local-smi or --dcgm"),
    (["--ssh-jump", "login"], "--ssh-jump has no effect without --ssh"),
    (["--ssh", "node", "--local-smi"], "--ssh, --local-smi and --dcgm exclude each other"),
    (["--stages", "2:5", "--request-rate", "3"], "--stages replaces --request-rate"),
    (["--turns", "2"], "--turns needs --workload sessions"),
    (["--trace", "azure-llm-inference-2023-conv", "--workload", "sessions"],
     "--workload has no effect with --trace"),
    (["--workload", "prompts"], "--workload prompts and --prompt-file go together"),
    (["--prompt-file", "p.json"], "--workload prompts and --prompt-file go together"),
    (["--workload", "prompts", "--prompt-file", "p.json", "--input-len", "9"],
     "--input-len has no effect with --workload prompts"),
    # 0 and NaN had been taken for "not given" (1 was used) or passed every range check
    (["--burstiness", "0"], "0.0 is not in the range x>0"),
    (["--burstiness", "nan"], "'nan' is not a finite number"),
    (["--request-rate", "nan"], "'nan' is not a finite number"),
    (["--trace", "azure-llm-inference-2023-conv", "--rate-scale", "0"],
     "0.0 is not in the range x>0"),
    (["--trace", "azure-llm-inference-2023-conv", "--rate-scale", "inf"],
     "'inf' is not a finite number"),
])
def test_bench_options_without_effect_are_rejected(server, engine, tmp_path, args, message):
    result = CliRunner().invoke(tracer_cli, [
        "bench", "--url", server[1], "--output", str(tmp_path / "x"), "--engine", str(engine),
        *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x" / "requests.jsonl").exists()


def _sharegpt(path, conversations):
    path.write_text(json.dumps([{"id": f"c{i}", "conversations": [
        {"from": "human" if k % 2 == 0 else "gpt", "value": text} for k, text in enumerate(c)]}
        for i, c in enumerate(conversations)]))
    return path


def test_bench_sends_a_sharegpt_files_prompts_filtered_as_vllm_does(server, engine, tmp_path):
    words = lambda n, w="word": " ".join(f"{w}{i}" for i in range(n))    # noqa: E731
    usable = [(words(10 + i), words(20 + i, "answer")) for i in range(6)]
    skipped = [(words(50),),                                # one turn: no completion
               (words(60), "ok"),                           # output under 4 tokens
               (words(1100), words(30)),                    # prompt over 1,024 tokens
               (words(1000), words(1100))]                  # both over 2,048
    file = _sharegpt(tmp_path / "sharegpt.json", usable + skipped)
    out = tmp_path / "run"
    args = ["bench", "--url", server[1], "--engine", str(engine), "--workload", "prompts",
            "--prompt-file", str(file), "--request-rate", "50", "--seed", "2"]
    result = CliRunner().invoke(tracer_cli, [*args, "--output", str(out), "--num-prompts", "6"])
    assert result.exit_code == 0, result.output
    r = read_serving(out).requests
    sizes = sorted(zip(r["n_input_tokens"], r["n_output_tokens"], strict=True))
    assert sizes == [(10 + i, 20 + i) for i in range(6)]   # the server's counts: exact
    assert validate(out) == []
    fixed = CliRunner().invoke(tracer_cli, [*args, "--output", str(tmp_path / "fixed"),
                                            "--num-prompts", "3", "--output-len", "5"])
    assert fixed.exit_code == 0, fixed.output
    assert (read_serving(tmp_path / "fixed").requests["n_output_tokens"] == 5).all()
    more = CliRunner().invoke(tracer_cli, [*args, "--output", str(tmp_path / "x"),
                                           "--num-prompts", "7"])
    assert more.exit_code == 2 and "only 6 usable prompts in the file, 7 asked" in more.output


def test_bench_sends_a_token_id_files_prompts_as_they_are(server, engine, tmp_path):
    file = tmp_path / "workload.jsonl"
    file.write_text("".join(json.dumps({"input_toks": 5 + i, "output_toks": 3 + i,
                                        "input_tok_ids": list(range(100, 105 + i))}) + "\n"
                            for i in range(5)))
    out = tmp_path / "run"
    result = CliRunner().invoke(tracer_cli, [
        "bench", "--url", server[1], "--engine", str(engine), "--workload", "prompts",
        "--prompt-file", str(file), "--num-prompts", "5", "--request-rate", "inf",
        "--cache-salt", "none", "--output", str(out)])
    assert result.exit_code == 0, result.output
    r = read_serving(out).requests.sort_values("n_input_tokens")
    assert r["n_input_tokens"].tolist() == [5, 6, 7, 8, 9]
    assert r["n_output_tokens"].tolist() == [3, 4, 5, 6, 7]
    assert len(r["hash_ids"].iloc[0]) == 1                  # one partial 16-token block


@pytest.mark.parametrize("content,message", [
    ('[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}]',
     "sharegpt.json: field '[0].conversations[1].value': expected a turn with a text"),
    ('[{"id": 1}]', "field '[0].conversations': expected an object with a 'conversations'"),
    ('[{"conversations": []', "sharegpt.json: line 1: not valid JSON"),
    ('{"input_tok_ids": [1, 2], "output_toks": 2}\n{"input_tok_ids": [], "output_toks": 2}\n',
     "line 2: field 'input_tok_ids': expected a non-empty list of token ids"),
    ('{"input_tok_ids": [1, 2], "output_toks": 0}\n', "line 1: field 'output_toks'"),
    ('hello\n', "line 1: neither a ShareGPT JSON array nor JSON Lines of token ids"),
])
def test_a_bad_prompt_file_is_one_line_naming_file_row_and_field(server, engine, tmp_path,
                                                                content, message):
    file = tmp_path / "sharegpt.json"
    file.write_text(content)
    result = CliRunner().invoke(tracer_cli, [
        "bench", "--url", server[1], "--engine", str(engine), "--workload", "prompts",
        "--prompt-file", str(file), "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "requests.jsonl").exists()


def test_bench_samples_a_dcgm_exporter(server, engine, tmp_path):
    import fake_dcgm

    exporter, metrics_url, scrapes = fake_dcgm.start()
    try:
        out = tmp_path / "run"
        result = CliRunner().invoke(tracer_cli, [
            "bench", "--url", server[1], "--output", str(out), "--engine", str(engine),
            "--num-prompts", "8", "--input-len", "16", "--output-len", "8", "--request-rate",
            "20", "--dcgm", metrics_url, "--gpu-index", "1", "--loop-ms", "50"])
        assert result.exit_code == 0, result.output
        gpu = pd.read_parquet(out / "gpu_samples.parquet")
        assert set(gpu["gpu_index"]) == {1} and len(gpu) >= 4 and len(gpu) <= len(scrapes)
        assert (gpu["power_w"] >= 160).all() and gpu["power_w"].is_monotonic_increasing
        assert (gpu["clock_sm_mhz"] == 1710).all() and gpu["memory_used_mib"].eq(20480).all()
        assert gpu["utilization_memory_pct"].isna().all()          # not published: a gap
        assert "sample(s) with values the DCGM exporter could not read" in result.output
        assert json.loads((out / "engine.json").read_text())["gpu"] == "A10"   # as given
        assert validate(out) == []
        dead = CliRunner().invoke(tracer_cli, [
            "bench", "--url", server[1], "--output", str(tmp_path / "x"), "--engine",
            str(engine), "--dcgm", "http://127.0.0.1:9/metrics"])
        assert dead.exit_code == 2 and "the DCGM exporter is not available on http://127." \
            in dead.output
    finally:
        exporter.shutdown()


def test_bench_records_the_kv_cache_the_server_reports(server, engine, tmp_path):
    state, url = server
    state.cache_config = {"block_size": "16", "num_gpu_blocks": "1234",
                          "enable_prefix_caching": "False", "cache_dtype": "auto"}
    args = ["bench", "--url", url, "--num-prompts", "3", "--input-len", "8", "--output-len",
            "2", "--request-rate", "inf"]
    result = CliRunner().invoke(tracer_cli, [*args, "--engine", str(engine), "--output",
                                             str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    run = read_serving(tmp_path / "run")
    assert (run.engine["num_gpu_blocks"], run.engine["enable_prefix_caching"]) == (1234, False)
    assert "enable_prefix_caching" not in run.engine["assumed"]
    assert run.engine["from_server"] == ["block_size", "enable_prefix_caching",
                                         "num_gpu_blocks"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(engine.read_text()), "num_gpu_blocks": 900}))
    clash = CliRunner().invoke(tracer_cli, [*args, "--engine", str(other), "--output",
                                            str(tmp_path / "x")])
    assert clash.exit_code == 2 and "say num_gpu_blocks = 900, the server's /metrics 1234" \
        in clash.output
    assert not (tmp_path / "x" / "requests.jsonl").exists()


@pytest.mark.parametrize("settings,message", [
    ({"max_num_seqs": float("nan")}, "field 'engine.max_num_seqs': must be an integer >= 1"),
    ({"max_num_seqs": -3}, "field 'engine.max_num_seqs': must be an integer >= 1, got -3"),
    ({"gpu_memory_utilization": float("inf")},
     "field 'engine.gpu_memory_utilization': must be a number in (0, 1], got inf"),
    ({"enable_prefix_caching": "yes"}, "field 'engine.enable_prefix_caching': must be true"),
])
def test_bench_checks_the_engine_settings_before_it_sends_anything(tmp_path, settings,
                                                                  message):
    # the settings go into the dataset a run writes: a bad one is refused at once, naming the
    # file and the key, before the server is asked anything (this port has no server)
    path = tmp_path / "engine.json"
    path.write_text(json.dumps({"gpu": "A10", "max_num_seqs": 8,
                                "max_num_batched_tokens": 2048, **settings}))
    result = CliRunner().invoke(tracer_cli, [
        "bench", "--url", "http://127.0.0.1:9", "--output", str(tmp_path / "x"), "--engine",
        str(path), "--num-prompts", "2"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "engine.json" in result.output and "cannot reach" not in result.output
    assert not (tmp_path / "x").exists()
