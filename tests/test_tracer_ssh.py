"""SSH to a GPU node through a login node (two real OpenSSH sshd on loopback, ProxyJump and an
SSH config alias), the sampler's spool surviving ``kill -9`` and ``--resume``, and the local
sampler's gaps, GPU selection and early exits (a fake ``nvidia-smi`` on PATH)."""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from sshd import sshd_binary, start_sshd, write_fake_smi

from tracer.sampler import NvidiaSmiSampler, SamplerError, job_gpu_indices
from tracer.ssh import SSHError, SSHTarget


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A login node (no nvidia-smi) and a GPU node (the fake one), and an SSH config naming
    them ``login`` and ``node`` with ``ProxyJump login``."""
    if sshd_binary() is None:
        pytest.skip("OpenSSH sshd is not installed (.ci/run installs openssh-server)")
    root = tmp_path_factory.mktemp("cluster")
    login = start_sshd(root / "login", with_nvidia_smi=False)
    node = start_sshd(root / "node")
    known = root / "known_hosts"
    known.write_text(Path(login.known_hosts).read_text() + Path(node.known_hosts).read_text())
    config = root / "ssh_config"
    config.write_text(
        f"Host login\n  HostName 127.0.0.1\n  Port {login.port}\n  User {login.user}\n"
        f"  IdentityFile {login.key_file}\n  UserKnownHostsFile {known}\n"
        f"Host node\n  HostName 127.0.0.1\n  Port {node.port}\n  User {node.user}\n"
        f"  IdentityFile {node.key_file}\n  ProxyJump login\n  UserKnownHostsFile {known}\n")
    yield {"login": login, "node": node, "config": config, "root": root}
    for srv in (login, node):
        srv.process.terminate()
        srv.process.wait(timeout=10)


def test_ssh_config_alias_and_proxyjump_reach_the_node_through_the_login_node(cluster):
    target = SSHTarget.parse("node", config=cluster["config"])
    assert (target.port, target.jump.port) == (cluster["node"].port, cluster["login"].port)
    assert target.key_file == cluster["node"].key_file and target.jump.jump is None
    client = target.connect()                 # the route is proven by the next test
    try:
        _, out, _ = client.exec_command("echo reached")
        assert out.read().decode().strip() == "reached"
    finally:
        client.close()
    assert not client._via.get_transport()    # closing it closed the login connection too
    with NvidiaSmiSampler(target, loop_ms=20) as gpu:
        first = len(gpu.samples)              # entry waits for the first sample
        time.sleep(0.3)
    assert first >= 1 and len(gpu.samples) > first
    assert gpu.gpu_name == "NVIDIA H100 80GB HBM3"


def test_a_login_node_that_forbids_forwarding_is_one_clear_error(cluster):
    strict = start_sshd(cluster["root"] / "strict", with_nvidia_smi=False,
                        extra_config="AllowTcpForwarding no\n")
    try:
        node = SSHTarget.parse("node", config=cluster["config"])
        jump = SSHTarget("127.0.0.1", strict.user, strict.port, strict.key_file,
                         strict.known_hosts)
        with pytest.raises(SSHError, match=f"refused to forward to 127.0.0.1:"
                                           f"{cluster['node'].port}") as err:
            SSHTarget(node.host, node.user, node.port, node.key_file, node.known_hosts,
                      jump=jump).connect()
        assert strict.key_file not in str(err.value)
    finally:
        strict.process.terminate()
        strict.process.wait(timeout=10)


def test_kill_minus_nine_then_resume_loses_and_duplicates_no_row_or_sample(cluster, server,
                                                                          tmp_path):
    state, url = server
    state.timing.decode_per_token_s = 0.01                 # about 4 s of requests in all
    out = tmp_path / "run"
    args = [sys.executable, "-c", "from tracer.cli import main; main()", "collect", "--url",
            url, "--output", str(out),
            "--gpu", "A10", "--prefill-sizes", "16,32", "--decode-sizes", "32,64",
            "--repetitions", "5", "--warmup", "0", "--ssh", "node", "--ssh-config",
            str(cluster["config"]), "--loop-ms", "20"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log, spool = out / "measurements.jsonl", out / "gpu_samples.jsonl"

    def count(path):
        return len(path.read_text().splitlines()) if path.exists() else 0

    deadline = time.monotonic() + 60         # killed with rows and samples on disk
    while time.monotonic() < deadline and not (count(log) >= 6 and count(spool) >= 5):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    measured = len(log.read_text().splitlines())
    spooled = [x for x in spool.read_text().splitlines() if x.endswith("}")]  # whole lines
    assert 6 <= measured < 20 and len(spooled) >= 5
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    m = pd.read_parquet(out / "measurements.parquet")
    keys = ["sweep", "n_input_tokens", "n_output_tokens_requested", "repetition"]
    assert len(m) == 20 and not m[keys].duplicated().any() and m["error"].isna().all()
    gpu = pd.read_parquet(out / "gpu_samples.parquet")
    lines = [json.loads(x) for x in (out / "gpu_samples.jsonl").read_text().splitlines()]
    # every sample received before the kill is kept, and none twice
    assert [x["line"] for x in lines[:len(spooled)]] == [json.loads(x)["line"]
                                                         for x in spooled]
    assert len(gpu) == len(lines) and gpu["run_id"].nunique() == 2
    assert not gpu.duplicated(["run_id", "timestamp", "gpu_index"]).any()


def test_local_sampler_keeps_gaps_samples_only_the_jobs_gpus_and_reports_an_early_exit(
        tmp_path, monkeypatch):
    write_fake_smi(tmp_path / "bin", na_every=3, lines=12)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    spool = tmp_path / "gpu_samples.jsonl"
    spool.write_text('{"request_id": null, "li')      # a killed run's half-written line
    with NvidiaSmiSampler(None, loop_ms=10, spool=spool) as gpu:
        deadline = time.monotonic() + 10
        while gpu._exit is None and time.monotonic() < deadline:   # it stops by itself
            time.sleep(0.02)
    samples = gpu.samples
    assert gpu.gpu_indices == (1, 3) and set(samples["gpu_index"]) == {1, 3}
    assert len(samples) == 24 and samples["power_w"].isna().sum() == 8     # 4 of 12 × 2 GPUs
    gaps = " | ".join(gpu.gaps)
    assert "8 sample(s) with values nvidia-smi could not read" in gaps
    assert "nvidia-smi exited (status 0) after 24 lines" in gaps
    assert len(gpu.spooled()) == 24 and len(spool.read_text().splitlines()) == 24
    write_fake_smi(tmp_path / "bin", lines=0)            # a driver that never answers
    with pytest.raises(SamplerError, match="gave no sample"):
        NvidiaSmiSampler(None, loop_ms=10).__enter__()


def test_job_gpus_come_from_cuda_visible_devices_or_slurm():
    assert job_gpu_indices({"CUDA_VISIBLE_DEVICES": "2,0"}) == (2, 0)
    assert job_gpu_indices({"SLURM_JOB_GPUS": "5"}) == (5,)
    assert job_gpu_indices({"CUDA_VISIBLE_DEVICES": "GPU-1a2b"}) is None   # UUIDs: not indices
    assert job_gpu_indices({}) is None


SLURM = {      # stand-ins on the login node: the job runs at once on 127.0.0.1, GPU 1
    "sbatch": "#!/bin/sh\ncat > {state}/job.sh\necho 77\n",
    "squeue": "#!/bin/sh\necho 'RUNNING 127.0.0.1'\n",
    "scontrol": "#!/bin/sh\necho '   Nodes=127.0.0.1 CPU_IDs=0-3 Mem=0 GRES=gpu:a10:1(IDX:1)'\n",
    "scancel": "#!/bin/sh\necho \"$1\" >> {state}/cancelled\n",
}


@pytest.fixture()
def slurm_cluster(cluster, server, tmp_path):
    """The login node with Slurm stand-ins and real curl, the fake vLLM server as the job's
    server, the GPU node's sshd as ``127.0.0.1`` in an SSH config, and a cluster profile."""
    state = tmp_path / "slurm"
    state.mkdir()
    bin_dir = cluster["root"] / "login" / "bin"
    for name, text in SLURM.items():
        (bin_dir / name).write_text(text.format(state=state))
        (bin_dir / name).chmod(0o755)
    node = cluster["node"]
    config = tmp_path / "ssh_config"
    config.write_text(cluster["config"].read_text() + (
        f"Host 127.0.0.1\n  Port {node.port}\n  User {node.user}\n  IdentityFile "
        f"{node.key_file}\n  UserKnownHostsFile {cluster['root'] / 'known_hosts'}\n"))
    port = int(server[1].rsplit(":", 1)[1])
    profile = tmp_path / "cluster.toml"
    profile.write_text(f'name = "loopback"\nlogin = "login"\npartition = "gpu"\nport = {port}\n'
                       'vllm = "vllm serve {model} --port {port} --dtype {dtype}"\n')
    args = ["run", "--cluster", str(profile), "--model", "Llama-3-8B", "--gpu", "A10",
            "--ssh-config", str(config), "--poll", "0.05", "--loop-ms", "20"]
    return {"state": state, "args": args, "server": server[0], "bin": bin_dir}


def test_tracer_run_serves_benches_through_the_login_node_samples_and_cancels(slurm_cluster,
                                                                            tmp_path):
    from click.testing import CliRunner

    from archive.serving import read_serving
    from archive.validate import validate
    from tracer.cli import main as tracer_cli

    c, out = slurm_cluster, tmp_path / "run"
    result = CliRunner().invoke(tracer_cli, [
        *c["args"], "--vllm-args", "--max-num-seqs 8 --max-num-batched-tokens 2048 "
        "--enable-prefix-caching", "--output", str(out), "--request-rate", "50",
        "--num-prompts", "12", "--input-len", "32", "--output-len", "4"])
    assert result.exit_code == 0, result.output
    assert "12 of 12 requests succeeded" in result.output
    assert (c["state"] / "cancelled").read_text().split() == ["77"]      # cancelled at the end
    script = (c["state"] / "job.sh").read_text()
    assert "exec vllm serve Llama-3-8B --port" in script and "--max-num-seqs 8" in script
    run = read_serving(out)
    assert len(run.requests) == 12 and run.requests["error"].isna().all()
    assert c["server"].requests >= 13                 # through the forward (and a warm-up)
    assert (run.engine["max_num_seqs"], run.engine["max_num_batched_tokens"]) == (8, 2048)
    assert run.engine["enable_prefix_caching"] is True and "enable_prefix_caching" not in \
        run.engine["assumed"]
    assert "--max-num-seqs 8" in run.engine["launch_command"]
    assert run.engine["gpu"] == "NVIDIA H100 80GB HBM3"         # as the node's nvidia-smi says
    samples = pd.read_parquet(out / "gpu_samples.parquet")
    assert set(samples["gpu_index"]) == {1} and len(samples) >= 2      # only the job's GPU
    sent = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    first_send = datetime.fromtimestamp(min(r["send_unix_s"] for r in sent))
    assert samples["timestamp"].min() <= first_send      # sampling began before the first
    assert validate(out) == []
    import fake_dcgm

    exporter, metrics_url, _ = fake_dcgm.start()     # on the "node", reached via the login
    try:
        port = metrics_url.rsplit(":", 1)[1].split("/")[0]
        dcgm = CliRunner().invoke(tracer_cli, [
            *c["args"], "--vllm-args", "--max-num-seqs 8 --max-num-batched-tokens 2048",
            "--output", str(tmp_path / "dcgm"), "--num-prompts", "6", "--input-len", "16",
            "--output-len", "4", "--dcgm-port", port])
    finally:
        exporter.shutdown()
    assert dcgm.exit_code == 0, dcgm.output
    samples = pd.read_parquet(tmp_path / "dcgm" / "gpu_samples.parquet")
    assert set(samples["gpu_index"]) == {1} and (samples["power_w"] >= 160).all()
    assert read_serving(tmp_path / "dcgm").engine["gpu"] == "NVIDIA A10"


def test_tracer_run_checks_before_it_submits_and_cancels_on_sigterm(slurm_cluster, tmp_path):
    from click.testing import CliRunner

    from tracer.cli import main as tracer_cli

    c = slurm_cluster
    lacking = CliRunner().invoke(tracer_cli, [*c["args"], "--output", str(tmp_path / "a")])
    assert lacking.exit_code == 2 and "lack max_num_seqs, max_num_batched_tokens" in \
        lacking.output
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps({"max_num_seqs": 16, "max_num_batched_tokens": 2048}))
    clash = CliRunner().invoke(tracer_cli, [*c["args"], "--engine", str(engine), "--vllm-args",
                                            "--max-num-seqs 8", "--output", str(tmp_path / "b")])
    assert clash.exit_code == 2 and "says max_num_seqs = 16, the vLLM command 8" in clash.output
    assert not (c["state"] / "job.sh").exists()              # nothing was submitted
    c["server"].timing.decode_per_token_s = 0.02
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tracer.cli import main; main()", *c["args"], "--engine",
         str(engine), "--output", str(out), "--request-rate", "10", "--num-prompts", "200",
         "--input-len", "16", "--output-len", "10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "requests.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (log.exists()
                                               and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "job cancelled" in err, err
    assert (c["state"] / "cancelled").read_text().split() == ["77"]
    kept = log.read_text().splitlines()
    assert 3 <= len(kept) < 200 and all(json.loads(x)["request_id"] for x in kept)


def test_tracer_run_sampling_options_change_the_run_or_are_refused(slurm_cluster, tmp_path):
    from click.testing import CliRunner

    from tracer.cli import main as tracer_cli

    c = slurm_cluster
    base = [*c["args"], "--vllm-args", "--max-num-seqs 8 --max-num-batched-tokens 2048",
            "--num-prompts", "3", "--input-len", "16", "--output-len", "4"]
    chosen = CliRunner().invoke(tracer_cli, [*base, "--gpu-index", "0", "--output",
                                             str(tmp_path / "gpu0")])
    assert chosen.exit_code == 0, chosen.output
    samples = pd.read_parquet(tmp_path / "gpu0" / "gpu_samples.parquet")
    assert set(samples["gpu_index"]) == {0}               # not scontrol's GPU 1
    off = CliRunner().invoke(tracer_cli, [*base, "--no-gpu-samples", "--output",
                                          str(tmp_path / "off")])
    assert off.exit_code == 0, off.output
    assert not (tmp_path / "off" / "gpu_samples.parquet").exists()
    assert (c["state"] / "cancelled").read_text().split() == ["77", "77"]
    for option in (["--gpu-index", "1"], ["--dcgm-port", "9400"]):
        refused = CliRunner().invoke(tracer_cli, [*base, "--no-gpu-samples", *option,
                                                  "--output", str(tmp_path / "x")])
        assert refused.exit_code == 2 and f"{option[0]} has no effect with --no-gpu-samples" \
            in refused.output
    (c["bin"] / "squeue").write_text("#!/bin/sh\necho 'PENDING (Priority)'\n")
    late = CliRunner().invoke(tracer_cli, [*base, "--start-timeout", "0.3", "--output",
                                           str(tmp_path / "late")])
    assert late.exit_code == 2 and "job 77 did not start within 0 s" in late.output
    assert (c["state"] / "cancelled").read_text().split() == ["77"] * 3   # given up: cancelled
