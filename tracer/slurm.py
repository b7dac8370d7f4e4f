"""``tracer serve``: start vLLM on a Slurm GPU node over SSH, wait until it answers, cancel
the job at the end.

A cluster profile (TOML, see ``tracer/clusters/example-slurm.toml``) names the login node, the
partition, the GRES request, the time limit, the shell lines that prepare the environment and
the vLLM command. The job script is sent to ``sbatch --parsable`` on its standard input (no
file is left on the cluster); ``squeue`` tells when and where it runs; ``curl`` on the login
node polls ``http://NODE:PORT/health``; ``scancel`` ends it.
"""

from __future__ import annotations

import shlex
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from archive.errors import InputError
from tracer.ssh import SSHError, SSHTarget


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

    def job_script(self, model: str, gpu: str, dtype: str = "auto",
                   time_limit: str | None = None) -> str:
        """The batch script for one vLLM server."""
        values = {"model": shlex.quote(model), "gpu": gpu, "port": self.port, "dtype": dtype}
        lines = ["#!/bin/bash", "#SBATCH --job-name=kavier-vllm",
                 f"#SBATCH --partition={self.partition}",
                 f"#SBATCH --gres={self.gres.format(**values)}",
                 f"#SBATCH --time={time_limit or self.time}", "set -e", *self.setup,
                 "exec " + self.vllm.format(**values)]
        return "\n".join(lines) + "\n"


class SlurmJob:
    """A vLLM server job; a context manager that cancels the job on exit."""

    def __init__(self, profile: ClusterProfile, target: SSHTarget) -> None:
        self.profile, self.target = profile, target
        self.job_id: str | None = None
        self.node: str | None = None
        self._client = None

    def _run(self, command: str, stdin: str | None = None) -> tuple[int, str]:
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
