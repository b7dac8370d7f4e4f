"""Sample ``nvidia-smi`` while requests run: on the GPU node over SSH, or right here when the
tracer runs inside the Slurm job on the GPU node itself.

A background thread runs ``nvidia-smi [--id=I,J] --query-gpu=... --format=csv,noheader,nounits
--loop-ms=N`` and parses each line as it arrives, tagging it with the request in flight
(:attr:`NvidiaSmiSampler.request_id`, set by the sweep) and appending it to a spool file
(``gpu_samples.jsonl``, flushed per line, fsync'd about once a second) so that a killed job
loses at most the last second of samples; :meth:`NvidiaSmiSampler.spooled` reads them back,
across resumed runs. Entering the sampler waits for the first sample, so sampling covers the
run from before its first request.

Only the job's GPUs are sampled: ``gpu_indices`` (``--gpu-index``), or locally the indices in
``CUDA_VISIBLE_DEVICES`` or Slurm's ``SLURM_JOB_GPUS``; all GPUs of the node only when none is
known (other users' GPUs on a shared node, which the run then says). Values nvidia-smi cannot
read (``[N/A]``) are kept as gaps (NaN) and counted, and an ``nvidia-smi`` that exits before the
run ends is recorded with its exit status: :attr:`NvidiaSmiSampler.gaps` says both.

``power.draw`` is a one-second moving average on Ampere and newer GPUs; where the driver
offers ``power.draw.instant`` the sampler asks for that instead and records which it used.

Where an NVIDIA DCGM exporter runs on the node (``dcgm_url``, its ``/metrics``), the sampler
scrapes it every ``loop_ms`` instead of running nvidia-smi: each scrape's ``DCGM_FI_DEV_*``
gauges (:data:`DCGM_FIELDS`, the exporter's default counters) become one nvidia-smi-style line
per GPU (label ``gpu``), so the spool, the gaps and ``gpu_samples.parquet`` are the same. A
gauge the exporter does not publish is a gap; the exporter refreshes its values every
collection interval (``-c``, 30 s by default), so set it to the sampling interval you want.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from archive.errors import InputError
from archive.smi import parse
from tracer.jsonlog import cut_torn_tail, read_log
from tracer.ssh import SSHError, SSHTarget

QUERY = ("timestamp", "index", "utilization.gpu", "utilization.memory", "power.draw",
         "memory.used", "clocks.sm", "temperature.gpu")
"""Fields queried, in order (``power.draw`` becomes ``power.draw.instant`` when offered)."""

FIRST_SAMPLE_TIMEOUT_S = 15.0
"""How long entering the sampler waits for nvidia-smi's first line."""


class SamplerError(SSHError):
    """nvidia-smi trouble (missing, silent), described without secrets."""


def job_gpu_indices(environ: dict | None = None) -> tuple[int, ...] | None:
    """The GPUs of this Slurm job as nvidia-smi indices, from ``CUDA_VISIBLE_DEVICES`` or
    ``SLURM_JOB_GPUS`` (comma-separated integers; UUIDs or MIG names are not indices and give
    None, as does an unset variable)."""
    env = os.environ if environ is None else environ
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS"):
        value = env.get(name, "").strip()
        if value:
            parts = [p.strip() for p in value.split(",")]
            if all(p.isdigit() for p in parts):
                return tuple(int(p) for p in parts)
    return None


DCGM_FIELDS = {"utilization.gpu": "DCGM_FI_DEV_GPU_UTIL",
               "utilization.memory": "DCGM_FI_DEV_MEM_COPY_UTIL",
               "power.draw": "DCGM_FI_DEV_POWER_USAGE",
               "power.draw.instant": "DCGM_FI_DEV_POWER_USAGE_INSTANT",
               "memory.used": "DCGM_FI_DEV_FB_USED", "clocks.sm": "DCGM_FI_DEV_SM_CLOCK",
               "temperature.gpu": "DCGM_FI_DEV_GPU_TEMP"}
"""The DCGM exporter gauge behind each nvidia-smi field (same units: %, W, MiB, MHz, °C;
NVIDIA's ``etc/default-counters.csv`` of dcgm-exporter and the DCGM field reference)."""


class _Dcgm:
    """Scrapes a DCGM exporter's ``/metrics`` and answers the sampler's nvidia-smi commands
    with what it publishes (see the module docstring)."""

    name = "the DCGM exporter"

    def __init__(self, url: str) -> None:
        import requests

        self.where, self.url, self.session = url, url, requests.Session()

    def scrape(self) -> dict[int, dict]:
        """Per GPU index: metric name → value, plus ``modelName`` and the driver label."""
        from prometheus_client.parser import text_string_to_metric_families

        response = self.session.get(self.url, timeout=5)
        response.raise_for_status()
        gpus: dict[int, dict] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if "gpu" in sample.labels and sample.labels["gpu"].isdigit():
                    gpu = gpus.setdefault(int(sample.labels["gpu"]), {})
                    gpu[sample.name] = sample.value
                    gpu.setdefault("modelName", sample.labels.get("modelName", ""))
                    gpu.setdefault("driver", sample.labels.get("DCGM_FI_DRIVER_VERSION", ""))
        return gpus

    def run(self, command: list[str]) -> tuple[int, str]:
        import requests

        try:
            gpus = self.scrape()
        except (requests.RequestException, ValueError):
            return 1, ""
        if "--help-query-gpu" in command:
            instant = any(DCGM_FIELDS["power.draw.instant"] in g for g in gpus.values())
            return (0, '"power.draw.instant"') if instant else (0, "")
        first = gpus[min(gpus)] if gpus else {}
        return 0, f"{first.get('modelName', '')}, {first.get('driver', '')}\n"

    def stream(self, command: list[str]):
        """``readline``, ``stop`` and ``wait`` over scrapes every ``--loop-ms``, for the GPUs
        of ``--id`` (all without it)."""
        import requests

        fields = next(a.split("=", 1)[1] for a in command
                      if a.startswith("--query-gpu=")).split(",")
        loop_s = next(int(a.split("=", 1)[1]) for a in command
                      if a.startswith("--loop-ms=")) / 1000
        ids = next((set(map(int, a.split("=", 1)[1].split(","))) for a in command
                    if a.startswith("--id=")), None)
        pending: list[str] = []
        state = {"stopped": False, "status": 0, "next": time.monotonic()}

        def readline() -> str:
            while not pending and not state["stopped"]:
                delay = state["next"] - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                state["next"] = max(state["next"] + loop_s, time.monotonic())
                try:
                    gpus = self.scrape()
                except (requests.RequestException, ValueError) as exc:
                    state["stopped"] = True
                    state["status"] = f"scrape failed: {type(exc).__name__}"
                    break
                pending.extend(self._line(fields, i, g) for i, g in sorted(gpus.items())
                               if ids is None or i in ids)
            return pending.pop(0) if pending else ""

        def stop() -> None:
            state["stopped"] = True

        return readline, stop, lambda: state["status"]

    @staticmethod
    def _line(fields: list[str], index: int, gpu: dict) -> str:
        now = time.time()
        stamp = time.strftime("%Y/%m/%d %H:%M:%S.", time.localtime(now)) + (
            f"{int(now % 1 * 1000):03d}")
        values = {"timestamp": stamp, "index": str(index)}
        for name in fields:
            if name in DCGM_FIELDS:
                value = gpu.get(DCGM_FIELDS[name])
                values[name] = "[N/A]" if value is None else f"{value:g}"
        return ", ".join(values[f] for f in fields) + "\n"

    def close(self) -> None:
        self.session.close()


class _Local:
    """Runs nvidia-smi on this machine (inside the job on the GPU node)."""

    where, name = "this node", "nvidia-smi"

    def run(self, command: list[str]) -> tuple[int, str]:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            return 127, ""
        return done.returncode, done.stdout

    def stream(self, command: list[str]):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1)
        return process.stdout.readline, process.terminate, process.wait

    def close(self) -> None:
        return None


class _Remote:
    """Runs nvidia-smi on the GPU node over SSH."""

    name = "nvidia-smi"

    def __init__(self, target: SSHTarget) -> None:
        self.where = target.where
        self.client = target.connect()

    def run(self, command: list[str]) -> tuple[int, str]:
        _, out, _ = self.client.exec_command(" ".join(command), timeout=30)
        text = out.read().decode(errors="replace")
        return out.channel.recv_exit_status(), text

    def stream(self, command: list[str]):
        _, out, _ = self.client.exec_command(" ".join(command), get_pty=True)
        return out.readline, out.channel.close, out.channel.recv_exit_status

    def close(self) -> None:
        self.client.close()


@dataclass
class NvidiaSmiSampler:
    """Background nvidia-smi sampling, over SSH (``target``) or locally (``target=None``).

    Use as a context manager: sampling starts on entry (which returns once the first sample
    arrived) and stops on exit; :attr:`samples` then holds one row per sample with
    ``request_id`` (the request in flight, or None). :attr:`gpu_name` and
    :attr:`driver_version` are read from nvidia-smi on entry.

    Parameters
    ----------
    target : SSHTarget or None
    loop_ms : int
        Sampling interval, ms.
    gpu_indices : tuple of int or None
        GPUs to sample; None: locally the job's (:func:`job_gpu_indices`), else all.
    spool : Path or None
        JSON Lines file samples are appended to as they arrive.
    tags : dict
        Merged into every spooled sample (e.g. the run id).
    dcgm_url : str or None
        A DCGM exporter's ``/metrics`` to scrape instead of running nvidia-smi.

    Raises
    ------
    SamplerError
        On entry: nvidia-smi missing, or no sample within :data:`FIRST_SAMPLE_TIMEOUT_S`.
    SSHError
        On entry: the SSH connection failed.
    """

    target: SSHTarget | None = None
    loop_ms: int = 100
    gpu_indices: tuple[int, ...] | None = None
    spool: Path | None = None
    tags: dict = field(default_factory=dict)
    request_id: int | None = None
    fields: tuple[str, ...] = QUERY
    power_field: str = "power.draw"
    gpu_name: str = ""
    driver_version: str = ""
    dcgm_url: str | None = None
    _rows: list = field(default_factory=list)
    _errors: list = field(default_factory=list)
    _missing: int = 0
    _exit: str | None = None

    @property
    def where(self) -> str:
        """Where nvidia-smi runs (or the DCGM exporter's URL), for messages."""
        return self.dcgm_url or (self.target.where if self.target else "this node")

    def _command(self, fields, loop: bool = True) -> list[str]:
        ids = [f"--id={','.join(map(str, self.gpu_indices))}"] if self.gpu_indices else []
        return ["nvidia-smi", *ids, f"--query-gpu={','.join(fields)}",
                "--format=csv,noheader,nounits"] + ([f"--loop-ms={int(self.loop_ms)}"]
                                                    if loop else [])

    def __enter__(self) -> NvidiaSmiSampler:
        if self.target is None and self.dcgm_url is None and self.gpu_indices is None:
            self.gpu_indices = job_gpu_indices()
        self._runner = (_Dcgm(self.dcgm_url) if self.dcgm_url else
                        _Remote(self.target) if self.target else _Local())
        try:
            self._start()
        except BaseException:
            self._runner.close()
            raise
        return self

    def _start(self) -> None:
        status, help_text = self._runner.run(["nvidia-smi", "--help-query-gpu"])
        if status != 0:
            raise SamplerError(f"{self._runner.name} is not available on {self.where}")
        _, first = self._runner.run(self._command(("name", "driver_version"), loop=False))
        lines = first.strip().splitlines()
        if lines and "," in lines[0]:
            self.gpu_name, self.driver_version = (v.strip() for v in lines[0].split(",", 1))
        if "power.draw.instant" in help_text:
            self.fields = tuple("power.draw.instant" if f == "power.draw" else f
                                for f in self.fields)
            self.power_field = "power.draw.instant"
        if self.spool:
            cut_torn_tail(Path(self.spool))
        self._sink = open(self.spool, "a") if self.spool else None  # noqa: SIM115
        self._first = threading.Event()
        self._stopping = False
        self._readline, self._stop, self._wait = self._runner.stream(self._command(self.fields))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        if not self._first.wait(FIRST_SAMPLE_TIMEOUT_S) or not self._rows:
            self._stopping = True
            self._stop()
            raise SamplerError(f"{self._runner.name} on {self.where} gave no sample within "
                               f"{FIRST_SAMPLE_TIMEOUT_S:g} s" + (f" ({self._exit})"
                                                                  if self._exit else ""))

    def _read(self) -> None:
        number, synced = 0, time.monotonic()
        for line in iter(self._readline, ""):
            number += 1
            line = line.strip()
            if not line:
                continue
            try:
                row = parse([line], self.fields, f"nvidia-smi on {self.where}", missing_ok=True)
            except InputError as exc:
                self._errors.append(f"line {number}: {exc}")
                continue
            self._missing += int(row.drop(columns="timestamp").isna().any(axis=None))
            row["request_id"] = self.request_id
            self._rows.append(row)
            if self._sink:
                self._sink.write(json.dumps({**self.tags, "request_id": self.request_id,
                                             "line": line}) + "\n")
                self._sink.flush()
                if time.monotonic() - synced > 1.0:
                    os.fsync(self._sink.fileno())
                    synced = time.monotonic()
            self._first.set()
        if not self._stopping:
            self._exit = (f"{self._runner.name} exited (status {self._wait()}) after "
                          f"{number} lines")
        self._first.set()                 # never leave the entry waiting on a dead process

    def __exit__(self, *exc) -> None:
        self._stopping = True
        try:
            self._stop()
        finally:
            self._thread.join(timeout=5)
            self._runner.close()
            if self._sink:
                self._sink.flush()
                os.fsync(self._sink.fileno())
                self._sink.close()

    @property
    def samples(self) -> pd.DataFrame:
        """This run's samples (see :mod:`archive.smi` for the columns) plus ``request_id``."""
        if not self._rows:
            return pd.DataFrame()
        return pd.concat(self._rows, ignore_index=True)

    def spooled(self) -> pd.DataFrame:
        """Every sample in the spool file (all runs into it: a resumed sweep's too), with
        ``request_id`` and the tags; a torn last line (a killed job) is dropped
        (:func:`~tracer.jsonlog.read_log`)."""
        if not self.spool or not Path(self.spool).exists():
            return self.samples
        records, _ = read_log(Path(self.spool))
        if not records:
            return pd.DataFrame()
        rows = parse([r["line"] for r in records], self.fields, str(self.spool),
                     missing_ok=True)
        meta = pd.DataFrame([{k: v for k, v in r.items() if k != "line"} for r in records])
        return pd.concat([rows, meta], axis=1)

    @property
    def errors(self) -> list[str]:
        """Lines nvidia-smi printed that did not parse."""
        return list(self._errors)

    @property
    def gaps(self) -> list[str]:
        """What the samples lack, in words: samples with values nvidia-smi could not read,
        unparsable lines, an nvidia-smi that exited early, all of a shared node's GPUs."""
        out = []
        if self._missing:
            out.append(f"{self._missing} sample(s) with values {self._runner.name} could "
                       "not read ([N/A], or not published), kept as NaN")
        if self._errors:
            out.append(f"{len(self._errors)} line(s) that did not parse (first: "
                       f"{self._errors[0]})")
        if self._exit:
            out.append(self._exit)
        if not self.gpu_indices:
            out.append("every GPU of the node was sampled (no --gpu-index, no "
                       "CUDA_VISIBLE_DEVICES): other jobs' GPUs may be among them")
        return out
