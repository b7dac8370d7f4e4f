"""``tracer serve``: start vLLM on a Slurm GPU node over SSH, wait until it answers, cancel
the job at the end.

A cluster profile (TOML, see ``tracer/clusters/example-slurm.toml``) names the login node, the
partition, the GRES request, the time limit, the shell lines that prepare the environment and
the vLLM command. The job script is sent to ``sbatch --parsable`` on its standard input (no
file is left on the cluster); ``squeue`` tells when and where it runs; ``curl`` on the login
node polls ``http://NODE:PORT/health``; ``scancel`` ends it; ``scontrol show job -d`` names
the job's GPUs on the node. The vLLM command line is kept (:meth:`ClusterProfile.vllm_command`)
and its engine arguments read back (:func:`launch_settings`), so the run records how the
server was started.
"""

from __future__ import annotations

import re
import shlex
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from archive.errors import InputError
from tracer.ssh import LocalForward, SSHError, SSHTarget


class SlurmError(SSHError):
    """A job that could not be submitted, started or reached."""


@dataclass(frozen=True)
class ClusterProfile:
    """A Slurm cluster as a profile file describes it."""

    name: str
    login: str
    partition: str
    jump: str | None = None
    gres: str = "gpu:{gpu}:1"
    time: str = "01:00:00"
    port: int = 8000
    setup: tuple[str, ...] = ()
    vllm: str = "vllm serve {model} --port {port} --dtype {dtype}"
    extra: dict = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> ClusterProfile:
        """Read a profile.

        Raises
        ------
        InputError
            Unreadable file, bad TOML, or missing ``name``, ``login``, ``partition``.
        """
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror}", path=path) from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"not valid TOML: {exc}", path=path) from None
        missing = [k for k in ("name", "login", "partition") if k not in data]
        if missing:
            raise InputError(f"missing key(s) {missing}", path=path)
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(**{k: (tuple(v) if k == "setup" else v) for k, v in data.items()
                      if k in known}, extra={k: v for k, v in data.items() if k not in known})

    def target(self, key_file=None, known_hosts=None, accept_unknown_host=False,
               ssh_config=None) -> SSHTarget:
        """The login node as an SSH target (``login`` may be a ``~/.ssh/config`` alias;
        ``jump``, when given, is the host it is reached through)."""
        return SSHTarget.parse(self.login, key_file, known_hosts, accept_unknown_host,
                               self.jump, ssh_config)

    def vllm_command(self, model: str, gpu: str, dtype: str = "auto",
                     extra_args: str = "") -> str:
        """The vLLM command line the job runs: the profile's ``vllm`` template filled in,
        ``extra_args`` (``--vllm-args``) appended."""
        command = self.vllm.format(model=shlex.quote(model), port=self.port, dtype=dtype,
                                   gpu=gpu)
        return f"{command} {extra_args}".strip()

    def job_script(self, model: str, gpu: str, dtype: str = "auto",
                   time_limit: str | None = None, extra_args: str = "") -> str:
        """The batch script for one vLLM server."""
        lines = ["#!/bin/bash", "#SBATCH --job-name=kavier-vllm",
                 f"#SBATCH --partition={self.partition}",
                 f"#SBATCH --gres={self.gres.format(gpu=gpu)}",
                 f"#SBATCH --time={time_limit or self.time}", "set -e", *self.setup,
                 "exec " + self.vllm_command(model, gpu, dtype, extra_args)]
        return "\n".join(lines) + "\n"


SHORT_FLAGS = {"-tp": "tensor_parallel_size", "-pp": "pipeline_parallel_size",
               "-dp": "data_parallel_size"}
"""vLLM's short option names."""
RENAMED = {"num_gpu_blocks_override": "num_gpu_blocks"}
"""vLLM argument names whose value the archive's engine section keeps under another key."""
ENGINE_FROM_LAUNCH = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                      "enable_expert_parallel", "max_num_seqs", "max_num_batched_tokens",
                      "block_size", "num_gpu_blocks", "enable_prefix_caching",
                      "enable_chunked_prefill", "gpu_memory_utilization", "max_model_len",
                      "dtype", "async_scheduling", "kv_cache_dtype", "quantization")
"""Launch arguments a serving run's engine section records (``archive.serving.ENGINE_KEYS``
and the settings beside them)."""


def launch_settings(command: str) -> dict:
    """The engine arguments of a ``vllm serve MODEL --opt value ...`` command line, under
    vLLM's argument names with underscores (``--max-num-seqs 64`` → ``max_num_seqs: 64``,
    ``-tp 2`` → ``tensor_parallel_size: 2``, ``--enable-prefix-caching`` → True,
    ``--no-enable-prefix-caching`` → False, ``--num-gpu-blocks-override`` →
    ``num_gpu_blocks``); numbers as numbers, ``model`` the positional argument.

    Raises
    ------
    InputError
        For a line that is not ``vllm serve ...`` or does not split as a shell line.
    """
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise InputError(f"the vLLM command does not split as a shell line ({exc})",
                         field="vllm") from None
    if "serve" not in words:
        raise InputError(f"expected 'vllm serve MODEL ...', got {command[:60]!r}",
                         field="vllm")
    words = words[words.index("serve") + 1:]
    out: dict = {}
    k = 0
    while k < len(words):
        word = words[k]
        if not word.startswith("-"):
            out.setdefault("model", word)
            k += 1
            continue
        name, eq, value = word.partition("=")
        key = SHORT_FLAGS.get(name) or name.lstrip("-").replace("-", "_")
        if not eq and k + 1 < len(words) and not _is_option(words[k + 1]):
            value, k = words[k + 1], k + 1
        elif not eq:                          # a flag: --x is True, --no-x is x False
            value = "false" if key.startswith("no_") else "true"
            key = key.removeprefix("no_")
        out[RENAMED.get(key, key)] = _value(value)
        k += 1
    return out


def _is_option(word: str) -> bool:
    return word.startswith("-") and not re.fullmatch(r"-[\d.]+", word)


def _value(text: str):
    """A command-line value as the number or boolean it spells, else the text."""
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d*\.\d+(e-?\d+)?", text):
        return float(text)
    return {"true": True, "false": False}.get(text.lower(), text)


class SlurmJob:
    """A vLLM server job; a context manager that cancels the job on exit."""

    def __init__(self, profile: ClusterProfile, target: SSHTarget) -> None:
        self.profile, self.target = profile, target
        self.job_id: str | None = None
        self.node: str | None = None
        self._client = None

    def _run(self, command: str, stdin: str | None = None) -> tuple[int, str]:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():   # dropped: squeue and scancel
            self._client.close()                              # must still reach the cluster
            self._client = self.target.connect()
        sin, out, err = self._client.exec_command(command, timeout=60)
        if stdin is not None:
            sin.write(stdin)
            sin.channel.shutdown_write()
        text = out.read().decode(errors="replace")
        return out.channel.recv_exit_status(), text + err.read().decode(errors="replace")

    def submit(self, script: str) -> str:
        """``sbatch --parsable`` the script; returns the job id.

        Raises
        ------
        SlurmError
            When sbatch is missing or refuses the job (its message is passed on).
        """
        self._client = self.target.connect()
        status, text = self._run("sbatch --parsable", stdin=script)
        if status != 0 or not text.strip():
            raise SlurmError(f"sbatch on {self.target.host} failed: {text.strip()[:200]}")
        self.job_id = text.strip().split(";")[0]
        return self.job_id

    def wait_running(self, timeout_s: float = 3600, poll_s: float = 5) -> str:
        """Wait until the job runs; returns its node."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _, text = self._run(f"squeue -h -j {self.job_id} -o '%T %N'")
            parts = text.split()
            if parts and parts[0] == "RUNNING" and len(parts) > 1:
                self.node = parts[1]
                return self.node
            if not parts or parts[0] in ("FAILED", "CANCELLED", "TIMEOUT", "COMPLETED"):
                raise SlurmError(f"job {self.job_id} ended before running "
                                   f"({parts[0] if parts else 'gone'})")
            time.sleep(poll_s)
        raise SlurmError(f"job {self.job_id} did not start within {timeout_s:.0f} s")

    def wait_healthy(self, timeout_s: float = 1800, poll_s: float = 5) -> str:
        """Wait until vLLM answers ``/health`` (asked from the login node); returns its URL."""
        url = f"http://{self.node}:{self.profile.port}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status, _ = self._run(f"curl -sf -o /dev/null {url}/health")
            if status == 0:
                return url
            time.sleep(poll_s)
        raise SlurmError(f"vLLM on {self.node} did not answer /health within "
                           f"{timeout_s:.0f} s")

    def gpu_indices(self) -> tuple[int, ...] | None:
        """The job's GPUs on its node as nvidia-smi indices, from ``scontrol show job -d``'s
        ``GRES=gpu:…(IDX:0-1,3)``; None when Slurm does not say."""
        status, text = self._run(f"scontrol show job -d {self.job_id}")
        found = re.search(r"GRES=\S*?\(IDX:([0-9,\-]+)\)", text) if status == 0 else None
        if not found:
            return None
        indices: list[int] = []
        for part in found.group(1).split(","):
            low, _, high = part.partition("-")
            indices.extend(range(int(low), int(high or low) + 1))
        return tuple(indices)

    def forward(self, port: int | None = None) -> LocalForward:
        """A local port forward to ``port`` (default: the job's vLLM) on the job's node,
        through the login connection (enter it)."""
        self._client.get_transport().set_keepalive(30)
        return LocalForward(self._client, self.node, port or self.profile.port)

    def cancel(self) -> None:
        """``scancel`` the job (idempotent)."""
        if self.job_id and self._client is not None:
            self._run(f"scancel {self.job_id}")
            self.job_id = None

    def __enter__(self) -> SlurmJob:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.cancel()
        finally:
            if self._client is not None:
                self._client.close()
