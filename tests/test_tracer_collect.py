"""``tracer collect`` against a real HTTP server on loopback and a real sshd on loopback."""

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from sshd import sshd_binary, start_sshd

from archive.errors import InputError
from archive.schema import GPU_SAMPLES
from archive.validate import validate
from tracer.cli import main as tracer_cli
from tracer.client import VLLMClient
from tracer.collect import Setup, SweepPlan, collect
from tracer.sampler import NvidiaSmiSampler, SamplerError
from tracer.ssh import SSHError, SSHTarget

MODEL = "Llama-3-8B"
SECRET = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if sshd_binary() is None:
        pytest.skip("OpenSSH sshd is not installed (.ci/run installs openssh-server)")
    srv = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield srv
    srv.process.terminate()
    srv.process.wait(timeout=10)


def target(srv, **changes):
    return SSHTarget(**{"host": srv.host, "user": srv.user, "port": srv.port,
                        "key_file": srv.key_file, "known_hosts": srv.known_hosts, **changes})


def test_streaming_client_measures_what_the_server_does(server):
    state, url = server
    client = VLLMClient(url)
    prompt = client.prompt_tokens(MODEL, 1000)
    assert len(prompt) == 1000                              # exact, as token ids
    before = client.metrics()
    r = client.complete(MODEL, prompt, 20, cache_salt="s1")
    after = client.metrics()
    true_prefill = 0.004 + 2e-6 * 1000
    assert r.success and (r.n_input_tokens, r.n_output_tokens) == (1000, 20)
    assert true_prefill <= r.ttft_s < true_prefill + 0.05
    assert len(r.itl_s) == 19 and 0.002 <= sorted(r.itl_s)[9] < 0.004
    assert r.tpot_s == pytest.approx((r.latency_s - r.ttft_s) / 19)
    engine_prefill = after["prefill"] - before["prefill"]
    assert true_prefill <= engine_prefill <= r.ttft_s       # client sees engine + HTTP
    assert state.salts == ["s1"]


def test_api_key_is_sent_and_never_shown(server, tmp_path):
    state, url = server
    state.api_key = SECRET
    assert VLLMClient(url, SECRET).models()[0]["id"] == MODEL
    result = VLLMClient(url, "wrong").complete(MODEL, [1, 2, 3], 2)
    assert not result.success and "401" in result.error and "wrong" not in result.error
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    out = tmp_path / "run"
    cli = CliRunner().invoke(tracer_cli, [
        "collect", "--url", url, "--output", str(out), "--gpu", "A10",
        "--prefill-sizes", "8", "--decode-sizes", "4", "--repetitions", "1", "--warmup", "0",
        "--api-key-file", str(key_file)])
    assert cli.exit_code == 0, cli.output
    for path in out.iterdir():
        assert SECRET not in path.read_text(errors="ignore"), path
    assert SECRET not in cli.output


@pytest.mark.parametrize("url,message", [
    ("127.0.0.1:8000", "expected a URL like http://node:8000"),
    ("http://127.0.0.1:80x0", "port is not a number"),
    (f"http://127.0.0.1:1/?api_key={SECRET}", "must not carry a query string"),
])
def test_bad_urls_are_one_line_and_never_show_a_key(tmp_path, url, message):
    cli = CliRunner().invoke(tracer_cli, ["collect", "--url", url, "--output",
                                          str(tmp_path / "run"), "--gpu", "A10"])
    assert cli.exit_code == 2 and message in cli.output, cli.output
    assert SECRET not in cli.output and "Traceback" not in cli.output


def test_credentials_in_the_url_are_sent_as_basic_auth_and_never_shown(server, tmp_path):
    state, url = server
    host = url.removeprefix("http://")
    client = VLLMClient(f"http://user:{SECRET}@{host}/")
    assert client.base_url == url and client.session.auth == ("user", SECRET)
    assert client.models()[0]["id"] == MODEL
    cli = CliRunner().invoke(tracer_cli, [
        "collect", "--url", f"http://user:{SECRET}@127.0.0.1:1", "--output",
        str(tmp_path / "run"), "--gpu", "A10", "--timeout", "1"])
    assert cli.exit_code == 2 and "cannot reach http://127.0.0.1:1" in cli.output, cli.output
    assert SECRET not in cli.output


def test_collect_end_to_end_with_gpu_sampling_then_calibrate(server, sshd, tmp_path):
    state, url = server
    state.fail_next = 0
    out = tmp_path / "dataset"
    plan = SweepPlan((64, 128, 256, 512), (8, 16, 32, 64), repetitions=2, warmup=1)
    setup = Setup("loopback", "A10", MODEL, MODEL, engine_version="0.0.0-fake")
    with_sampler = NvidiaSmiSampler(target(sshd), loop_ms=20)
    collect(VLLMClient(url), plan, setup, out, with_sampler)
    assert validate(out) == []
    m = pd.read_parquet(out / "measurements.parquet")
    assert len(m) == 16 and m["error"].isna().all()
    assert (m.loc[m.sweep == "prefill", "n_input_tokens"].tolist()
            == [64, 64, 128, 128, 256, 256, 512, 512])
    assert (m["engine_prefill_s"] > 0).all() and (m["ttft_s"] >= m["engine_prefill_s"]).all()
    gpu = pq.read_table(out / "gpu_samples.parquet")
    assert gpu.schema.equals(GPU_SAMPLES) and gpu.num_rows > 5
    assert set(gpu.column("power_field").to_pylist()) == {"power.draw.instant"}
    tagged = set(gpu.column("request_id").drop_null().to_pylist())
    assert tagged and tagged <= set(range(16))
    assert len(set(state.salts)) == len(state.salts)        # prefix cache defeated
    setup_json = json.loads((out / "setup.json").read_text())
    assert setup_json["gpu_power_field"] == "power.draw.instant"
    assert (setup_json["gpu_name_smi"], setup_json["driver_version"]) == (
        "NVIDIA H100 80GB HBM3", "580.159.04")
    from kavier.cli import main as kavier_cli

    cal = CliRunner().invoke(kavier_cli, ["calibrate", "--dataset", str(out),
                                          "--output-folder", str(tmp_path / "cal")])
    assert cal.exit_code == 0, cal.output
    assert json.loads((tmp_path / "cal" / "profile.json").read_text())["gpu"] == "A10"


def test_failures_are_recorded_and_resume_continues(server, tmp_path):
    state, url = server
    state.fail_next = 1
    plan = SweepPlan((8, 16), (4,), repetitions=2, warmup=0)
    setup = Setup("loopback", "A10", MODEL, MODEL)
    out = tmp_path / "run"

    def crash_after_three(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(VLLMClient(url), plan, setup, out, progress=crash_after_three)
    kept = (out / "measurements.jsonl").read_text().splitlines()
    assert len(kept) == 3 and json.loads(kept[0])["error"] == "POST /v1/completions answered " \
                                                              "HTTP 500: internal error"
    with pytest.raises(InputError, match="3 measured rows are already here; pass --resume"):
        collect(VLLMClient(url), plan, setup, out)          # never deletes measurements
    assert (out / "measurements.jsonl").read_text().splitlines() == kept
    with open(out / "measurements.jsonl", "a") as log:       # a crash mid-line
        log.write('{"sweep": "prefill", "n_inp')
    collect(VLLMClient(url), plan, setup, out, resume=True)
    m = pd.read_parquet(out / "measurements.parquet")
    keys = ["sweep", "n_input_tokens", "n_output_tokens_requested", "repetition"]
    assert len(m) == 6 and m[keys].duplicated().sum() == 0
    assert m["error"].notna().sum() == 1


def test_ssh_errors_are_clear_and_hold_no_secrets(sshd, tmp_path):
    with pytest.raises(SSHError, match="not in known_hosts"):
        target(sshd, known_hosts=str(tmp_path / "empty")).connect()
    other = tmp_path / "other"
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True)
    with pytest.raises(SSHError, match="authentication refused") as err:
        target(sshd, key_file=str(other)).connect()
    assert Path(str(other)).read_text().splitlines()[1] not in str(err.value)
    with pytest.raises(SSHError, match="cannot connect"):
        target(sshd, port=1).connect(timeout_s=2)
    accepted = target(sshd, known_hosts=str(tmp_path / "empty"), accept_unknown_host=True)
    accepted.connect().close()


def test_missing_nvidia_smi_is_reported(tmp_path):
    if sshd_binary() is None:
        pytest.skip("OpenSSH sshd is not installed")
    srv = start_sshd(tmp_path / "bare", with_nvidia_smi=False)
    try:
        with pytest.raises(SamplerError, match="nvidia-smi is not available"), \
                NvidiaSmiSampler(target(srv)):
            pass
    finally:
        srv.process.terminate()
        srv.process.wait(timeout=10)


def test_concurrency_levels_send_requests_together(server, tmp_path):
    state, url = server
    plan = SweepPlan((16, 32), (16, 32), repetitions=2, warmup=0, concurrency=(1, 4))
    out = collect(VLLMClient(url), plan, Setup("loopback", "A10", MODEL, MODEL), tmp_path / "c")
    m = pd.read_parquet(out / "measurements.parquet")
    assert len(m) == 4 * (1 + 4) * 2 and set(m["concurrency"]) == {1, 4}
    together = m[(m["concurrency"] == 4) & (m["sweep"] == "decode")]
    alone = m[(m["concurrency"] == 1) & (m["sweep"] == "decode")]
    assert together["engine_decode_s"].isna().all() and alone["engine_decode_s"].notna().all()
    # four in flight on a server that serves them in parallel threads: about as fast as one
    assert together["latency_s"].median() < 3 * alone["latency_s"].median()
    assert validate(out) == []
    from kavier.cli import main as kavier_cli

    cal = CliRunner().invoke(kavier_cli, ["calibrate", "--dataset", str(out),
                                          "--output-folder", str(tmp_path / "cal")])
    assert cal.exit_code == 0, cal.output
    assert "batching overheads from 8 concurrent groups" in cal.output
    params = json.loads((tmp_path / "cal" / "profile.json").read_text())["params"]
    assert params["batch_step_overhead_s"] >= 0 and params["batch_seq_overhead_s"] >= 0


FAKE_SLURM = {
    "sbatch": "#!/bin/sh\ncat > {state}/job.sh\necho 4242 > {state}/job\necho 4242\n",
    "squeue": "#!/bin/sh\n[ -f {state}/cancelled ] && exit 0\n"
              "if [ -f {state}/polled ]; then echo 'RUNNING gpu-node-7'; "
              "else touch {state}/polled; echo 'PENDING (None)'; fi\n",
    "curl": "#!/bin/sh\n[ -f {state}/polled ] && case \"$*\" in "
            "*gpu-node-7:8123/health*) exit 0;; esac\nexit 7\n",
    "scancel": "#!/bin/sh\necho \"$1\" > {state}/cancelled\n",
}


def test_serve_submits_waits_and_cancels(sshd, tmp_path):
    from tracer.slurm import ClusterProfile, SlurmJob

    bin_dir = Path(sshd.key_file).parent / "bin"
    state = tmp_path / "slurm"
    state.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text.format(state=state))
        (bin_dir / name).chmod(0o755)
    profile_path = tmp_path / "cluster.toml"
    profile_path.write_text(
        f'name = "loopback"\nlogin = "{sshd.user}@127.0.0.1:{sshd.port}"\n'
        'partition = "gpu_a100"\nport = 8123\nsetup = ["module load 2024"]\n')
    profile = ClusterProfile.read(profile_path)
    import tracer

    example = ClusterProfile.read(Path(tracer.__file__).parent / "clusters" /
                                  "example-slurm.toml")
    assert "#SBATCH --gres=gpu:H100:1" in example.job_script("m", "H100")
    with SlurmJob(profile, profile.target(sshd.key_file, sshd.known_hosts)) as job:
        assert job.submit(profile.job_script("meta-llama/Llama-3.1-8B", "A100")) == "4242"
        assert job.wait_running(timeout_s=10, poll_s=0.05) == "gpu-node-7"
        assert job.wait_healthy(timeout_s=10, poll_s=0.05) == "http://gpu-node-7:8123"
    script = (state / "job.sh").read_text()
    assert "#SBATCH --gres=gpu:A100:1" in script and "#SBATCH --partition=gpu_a100" in script
    assert "module load 2024" in script and "vllm serve meta-llama/Llama-3.1-8B --port 8123" \
        in script
    assert (state / "cancelled").read_text().strip() == "4242"    # cancelled on exit
    (state / "cancelled").unlink()
    with SlurmJob(profile, profile.target(sshd.key_file, sshd.known_hosts)) as job:
        job.submit(profile.job_script("m", "A100"))
        job._client.get_transport().close()        # the login connection drops mid-run
    assert (state / "cancelled").read_text().strip() == "4242"    # reconnected to cancel
    (state / "cancelled").unlink()
    (state / "polled").unlink()
    result = CliRunner().invoke(tracer_cli, [
        "serve", "--cluster", str(profile_path), "--model", "m", "--gpu", "A100",
        "--ssh-key", sshd.key_file, "--known-hosts", sshd.known_hosts, "--detach",
        "--poll", "0.05", "--vllm-args", "-tp 2 --max-num-seqs 32 --no-enable-prefix-caching "
        "--kv-cache-dtype fp8", "--engine-out", str(tmp_path / "engine.json")])
    assert result.exit_code == 0, result.output
    assert "http://gpu-node-7:8123" in result.output and not (state / "cancelled").exists()
    engine = json.loads((tmp_path / "engine.json").read_text())
    assert engine["launch_command"] == ("vllm serve m --port 8123 --dtype auto -tp 2 "
                                        "--max-num-seqs 32 --no-enable-prefix-caching "
                                        "--kv-cache-dtype fp8")
    assert (engine["tensor_parallel_size"], engine["max_num_seqs"]) == (2, 32)
    assert engine["kv_cache_dtype"] == "fp8"        # the replay's KV bytes follow it
    assert engine["enable_prefix_caching"] is False and engine["job_id"] == "4242"
    assert "-tp 2 --max-num-seqs 32" in (state / "job.sh").read_text()


def test_launch_settings_read_vllms_engine_arguments_back():
    from tracer.slurm import launch_settings

    got = launch_settings("vllm serve 'meta-llama/Llama-3.1-8B' --port 8000 "
                          "--gpu-memory-utilization=0.85 --trust-remote-code -tp 2 "
                          "--num-gpu-blocks-override 900 --enable-chunked-prefill --seed -1")
    assert got == {"model": "meta-llama/Llama-3.1-8B", "port": 8000,
                   "gpu_memory_utilization": 0.85, "trust_remote_code": True,
                   "tensor_parallel_size": 2, "num_gpu_blocks": 900,
                   "enable_chunked_prefill": True, "seed": -1}
    with pytest.raises(InputError, match="expected 'vllm serve MODEL"):
        launch_settings("python -m something")
    with pytest.raises(InputError, match="does not split as a shell line"):
        launch_settings("vllm serve 'unclosed")


def test_logs_read_back_after_a_crash(tmp_path):
    from tracer.jsonlog import read_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"a": 1}\n{"a": 2}\n{"a": 3')              # torn by a kill
    assert read_log(log) == ([{"a": 1}, {"a": 2}], True)
    assert log.read_text() == '{"a": 1}\n{"a": 2}\n'           # cut off the file too
    log.write_text('{"a": 1}\n{"a": 2}')                       # whole, but no newline yet
    assert read_log(log) == ([{"a": 1}, {"a": 2}], False)
    with open(log, "a") as f:                                   # the next record is its own
        f.write('{"a": 3}\n')
    assert read_log(log)[0] == [{"a": 1}, {"a": 2}, {"a": 3}]
    log.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(InputError, match="line 2: not JSON"):
        read_log(log)
    assert read_log(tmp_path / "missing.jsonl") == ([], False)


def test_collect_samples_a_dcgm_exporter_and_tags_the_requests(server, tmp_path):
    import fake_dcgm

    state, url = server
    state.timing.decode_per_token_s = 0.01
    exporter, metrics_url, _ = fake_dcgm.start()
    try:
        out = tmp_path / "ds"
        result = CliRunner().invoke(tracer_cli, [
            "collect", "--url", url, "--output", str(out), "--gpu", "A10", "--prefill-sizes",
            "16", "--decode-sizes", "32", "--repetitions", "3", "--warmup", "0", "--dcgm",
            metrics_url, "--gpu-index", "0", "--loop-ms", "20"])
    finally:
        exporter.shutdown()
    assert result.exit_code == 0, result.output
    assert json.loads((out / "setup.json").read_text())["node"] == "127.0.0.1"
    samples = pd.read_parquet(out / "gpu_samples.parquet")
    assert set(samples["gpu_index"]) == {0} and samples["request_id"].notna().any()
    assert validate(out) == []
