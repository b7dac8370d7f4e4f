"""A real OpenSSH ``sshd`` on loopback for the tracer's SSH code, with a fake ``nvidia-smi``.

Host and user keys are generated per test session; the daemon listens on 127.0.0.1 at a free
unprivileged port and accepts only the generated user key. On its PATH sits a fake
``nvidia-smi`` that replays the real H100 capture (``tests/data``) in whatever field order is
queried, one line per ``--loop-ms`` (at most 6,000 lines, so it always ends).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CAPTURE = Path(__file__).parent / "data" / "nvidia-smi-h100-loop100ms.csv"

FAKE_SMI = '''#!{python}
"""Fake nvidia-smi: replays a real capture for --query-gpu=... --loop-ms=N."""
import sys, time
args = sys.argv[1:]
if "--help-query-gpu" in args:
    print("Valid properties for the query are:\\n\\"timestamp\\"\\n\\"power.draw\\"{instant}")
    sys.exit(0)
query = next(a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")).split(",")
loop = next((int(a.split("=", 1)[1]) for a in args if a.startswith("--loop-ms=")), 0)
ids = next((a.split("=", 1)[1].split(",") for a in args if a.startswith("--id=")), ["0"])
na_every = int("{na_every}")           # every k-th sample has [N/A] power (0: never)
lines = int("{lines}")                 # samples before exiting (as a crashing driver would)
order = ["timestamp", "utilization.gpu", "utilization.memory", "power.draw", "memory.used",
         "clocks.sm", "temperature.gpu"]
rows = [[v.strip() for v in line.split(",")] for line in open("{capture}") if line.strip()]
for n, row in enumerate(rows[:lines]):
    values = dict(zip(order, row))
    if na_every and n % na_every == na_every - 1:
        values["power.draw"] = "[N/A]"
    values["power.draw.instant"] = values["power.draw"]
    values["name"] = "NVIDIA H100 80GB HBM3"
    values["driver_version"] = "580.159.04"
    now = time.time()
    values["timestamp"] = time.strftime("%Y/%m/%d %H:%M:%S.", time.localtime(now)) + (
        "%03d" % int(now % 1 * 1000))
    for gpu in ids:
        values["index"] = gpu
        print(", ".join(values[q] for q in query), flush=True)
    if not loop:
        break
    time.sleep(loop / 1000)
'''


@dataclass
class SSHServer:
    host: str
    port: int
    user: str
    key_file: str
    known_hosts: str
    process: subprocess.Popen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def sshd_binary() -> str | None:
    """Path of OpenSSH's sshd, or None when it is not installed."""
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd",) if os.path.exists(p)),
                                        None)


def write_fake_smi(bin_dir: Path, instant_power: bool = True, na_every: int = 0,
                   lines: int = 6000) -> Path:
    """The fake ``nvidia-smi`` in ``bin_dir`` (see the module docstring): ``na_every``-th
    samples with ``[N/A]`` power, exiting after ``lines`` samples."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI.format(python=sys.executable, capture=CAPTURE,
                                   instant='\\n\\"power.draw.instant\\"' if instant_power
                                   else "", na_every=na_every, lines=lines))
    smi.chmod(0o755)
    return smi


def start_sshd(folder: Path, with_nvidia_smi: bool = True, instant_power: bool = True,
               extra_config: str = "") -> SSHServer:
    """Start sshd on loopback with fresh keys (``extra_config`` appended to its
    ``sshd_config``); the caller stops ``process``."""
    folder.mkdir(parents=True, exist_ok=True)
    host_key, user_key = folder / "host_key", folder / "user_key"
    _keygen(host_key)
    _keygen(user_key)
    authorized = folder / "authorized_keys"
    authorized.write_text((folder / "user_key.pub").read_text())
    authorized.chmod(0o600)
    bin_dir = folder / "bin"
    bin_dir.mkdir(exist_ok=True)
    if with_nvidia_smi:
        write_fake_smi(bin_dir, instant_power)
    port = _free_port()
    config = folder / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {authorized}
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PidFile {folder / "sshd.pid"}
SetEnv PATH={bin_dir}:/usr/local/bin:/usr/bin:/bin
LogLevel ERROR
{extra_config}""")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)      # privilege-separation directory
    process = subprocess.Popen([sshd_binary(), "-D", "-e", "-f", str(config)],
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"sshd exited: {process.stderr.read().decode()}") from None
            time.sleep(0.05)
    known = folder / "known_hosts"
    pub = (folder / "host_key.pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    return SSHServer("127.0.0.1", port, getpass.getuser(), str(user_key), str(known), process)
