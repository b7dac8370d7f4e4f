"""Sample ``nvidia-smi`` on the GPU node over SSH while requests run.

A background thread runs ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits
--loop-ms=N`` on the node through paramiko and parses each line as it arrives, tagging it with
the request in flight (:attr:`NvidiaSmiSampler.request_id`, set by the sweep). Host keys are
checked against ``known_hosts``; an unknown host is refused unless ``accept_unknown_host`` is
set explicitly. Authentication uses a key file or the SSH agent; no password, key or key path
ever appears in an error message.

``power.draw`` is a one-second moving average on Ampere and newer GPUs; where the driver
offers ``power.draw.instant`` the sampler asks for that instead and records which it used.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import paramiko

from archive.smi import parse

QUERY = ("timestamp", "index", "utilization.gpu", "utilization.memory", "power.draw",
         "memory.used", "clocks.sm", "temperature.gpu")
"""Fields queried, in order (``power.draw`` becomes ``power.draw.instant`` when offered)."""


class SamplerError(RuntimeError):
    """SSH or nvidia-smi trouble, described without secrets."""


@dataclass
class SSHTarget:
    """Where to sample: ``user@host:port`` with a key file or the agent."""

    host: str
    user: str
    port: int = 22
    key_file: str | None = None
    known_hosts: str | None = None
    accept_unknown_host: bool = False

    def connect(self, timeout_s: float = 10.0) -> paramiko.SSHClient:
        """An open, authenticated SSH client.

        Raises
        ------
        SamplerError
            Unreachable host, unknown or changed host key, refused authentication.
        """
        client = paramiko.SSHClient()
        known = Path(self.known_hosts or Path.home() / ".ssh" / "known_hosts")
        if known.exists():
            client.load_host_keys(str(known))
        client.set_missing_host_key_policy(
            paramiko.AutoAddPolicy() if self.accept_unknown_host else paramiko.RejectPolicy())
        where = f"{self.user}@{self.host}:{self.port}"
        try:
            client.connect(self.host, self.port, self.user, key_filename=self.key_file,
                           timeout=timeout_s, allow_agent=self.key_file is None,
                           look_for_keys=False)
        except paramiko.BadHostKeyException:
            raise SamplerError(f"host key of {where} does not match known_hosts") from None
        except paramiko.AuthenticationException:
            raise SamplerError(f"authentication refused for {where}") from None
        except paramiko.SSHException as exc:
            text = str(exc)
            if "not found in known_hosts" in text:
                raise SamplerError(f"{where} is not in known_hosts (add it, or pass "
                                   "--accept-unknown-host)") from None
            raise SamplerError(f"SSH to {where} failed: {type(exc).__name__}") from None
        except (TimeoutError, OSError) as exc:
            raise SamplerError(f"cannot connect to {where}: {exc.strerror or exc}") from None
        return client


@dataclass
class NvidiaSmiSampler:
    """Background nvidia-smi sampling over SSH.

    Use as a context manager: sampling starts on entry and stops on exit; :attr:`samples`
    then holds one row per sample with ``request_id`` (the request in flight, or None).
    :attr:`gpu_name` and :attr:`driver_version` are read from nvidia-smi on entry.
    """

    target: SSHTarget
    loop_ms: int = 100
    request_id: int | None = None
    fields: tuple[str, ...] = QUERY
    power_field: str = "power.draw"
    gpu_name: str = ""
    driver_version: str = ""
    _rows: list = field(default_factory=list)
    _errors: list = field(default_factory=list)

    def _command(self, fields) -> str:
        return (f"nvidia-smi --query-gpu={','.join(fields)} --format=csv,noheader,nounits "
                f"--loop-ms={int(self.loop_ms)}")

    def __enter__(self) -> NvidiaSmiSampler:
        self._client = self.target.connect()
        _, out, _ = self._client.exec_command("nvidia-smi --help-query-gpu", timeout=30)
        help_text = out.read().decode(errors="replace")
        if out.channel.recv_exit_status() != 0:
            self._client.close()
            raise SamplerError(f"nvidia-smi is not available on {self.target.host}")
        _, out, _ = self._client.exec_command(
            "nvidia-smi --query-gpu=name,driver_version --format=csv,noheader", timeout=30)
        first = out.read().decode(errors="replace").strip().splitlines()
        if first and "," in first[0]:
            self.gpu_name, self.driver_version = (v.strip() for v in first[0].split(",", 1))
        if "power.draw.instant" in help_text:
            self.fields = tuple("power.draw.instant" if f == "power.draw" else f
                                for f in self.fields)
            self.power_field = "power.draw.instant"
        self._stdin, self._stdout, _ = self._client.exec_command(self._command(self.fields),
                                                                 get_pty=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        number = 0
        for line in iter(self._stdout.readline, ""):
            number += 1
            line = line.strip()
            if not line:
                continue
            try:
                row = parse([line], self.fields, f"nvidia-smi on {self.target.host}")
            except ValueError as exc:
                self._errors.append(f"line {number}: {exc}")
                continue
            row["request_id"] = self.request_id
            self._rows.append(row)

    def __exit__(self, *exc) -> None:
        try:
            self._stdout.channel.close()
        finally:
            self._thread.join(timeout=5)
            self._client.close()

    @property
    def samples(self) -> pd.DataFrame:
        """All samples so far (see :mod:`archive.smi` for the columns) plus ``request_id``."""
        if not self._rows:
            return pd.DataFrame()
        return pd.concat(self._rows, ignore_index=True)

    @property
    def errors(self) -> list[str]:
        """Lines nvidia-smi printed that did not parse."""
        return list(self._errors)
