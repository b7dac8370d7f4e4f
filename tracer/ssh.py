"""SSH to cluster nodes with paramiko: a login node, or a GPU node reached through it.

On SURF Snellius and DAS-6 the GPU nodes are reachable only from the login node, and only while
a job holds them. :class:`SSHTarget` connects directly or through a jump host (OpenSSH's
``ProxyJump``: a ``direct-tcpip`` channel opened on the jump host's connection carries the
second SSH session), and reads ``~/.ssh/config`` host aliases with paramiko's
:class:`~paramiko.config.SSHConfig` (``HostName``, ``User``, ``Port``, ``IdentityFile``,
``ProxyJump``, ``UserKnownHostsFile``). Every host key is checked against ``known_hosts``; an
unknown host is refused unless ``accept_unknown_host`` is set explicitly. Authentication uses a
key file or the SSH agent; no password, key or key path ever appears in an error message.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import paramiko


class SSHError(RuntimeError):
    """SSH trouble (unreachable, unknown or changed host key, refused login, a jump host that
    forbids forwarding), described without secrets."""


@dataclass(frozen=True)
class SSHTarget:
    """Where to connect: ``user@host:port`` with a key file or the agent, optionally through
    ``jump`` (another target, itself possibly jumped)."""

    host: str
    user: str
    port: int = 22
    key_file: str | None = None
    known_hosts: str | None = None
    accept_unknown_host: bool = False
    jump: SSHTarget | None = None

    @property
    def where(self) -> str:
        """``user@host:port`` (and the jump host), for messages."""
        via = f" via {self.jump.where}" if self.jump else ""
        return f"{self.user}@{self.host}:{self.port}{via}"

    @classmethod
    def parse(cls, spec: str, key_file: str | None = None, known_hosts: str | None = None,
              accept_unknown_host: bool = False, jump: str | None = None,
              config: str | Path | None = None, default_user: str = "") -> SSHTarget:
        """A target from ``user@host[:port]`` or a ``Host`` alias of the SSH config file.

        ``config`` defaults to ``~/.ssh/config`` when it exists. Values given here win over the
        config's; ``jump`` (``user@host[:port]`` or an alias) wins over its ``ProxyJump``,
        whose first hop is used when it lists several.

        Raises
        ------
        SSHError
            For an unreadable config file or a port that is not a number.
        """
        return _parse(spec, key_file, known_hosts, accept_unknown_host, jump,
                      _load_config(config), default_user, depth=0)

    def connect(self, timeout_s: float = 10.0) -> paramiko.SSHClient:
        """An open, authenticated SSH client (through the jump host when there is one);
        closing it closes the jump connection too.

        Raises
        ------
        SSHError
            Unreachable host, unknown or changed host key, refused authentication, a jump
            host that refuses to forward.
        """
        via = self.jump.connect(timeout_s) if self.jump else None
        sock = None
        if via is not None:
            try:
                sock = via.get_transport().open_channel("direct-tcpip", (self.host, self.port),
                                                        ("127.0.0.1", 0), timeout=timeout_s)
            except (paramiko.SSHException, OSError) as exc:
                via.close()
                raise SSHError(f"{self.jump.where} refused to forward to "
                               f"{self.host}:{self.port} ({type(exc).__name__}: "
                               f"{str(exc)[:80]})") from None
        client = _JumpedClient(via)
        known = Path(self.known_hosts or Path.home() / ".ssh" / "known_hosts")
        if known.exists():
            client.load_host_keys(str(known))
        client.set_missing_host_key_policy(
            paramiko.AutoAddPolicy() if self.accept_unknown_host else paramiko.RejectPolicy())
        try:
            client.connect(self.host, self.port, self.user, key_filename=self.key_file,
                           timeout=timeout_s, allow_agent=self.key_file is None,
                           look_for_keys=False, sock=sock)
        except Exception as exc:
            client.close()
            raise _ssh_error(exc, self.where) from None
        return client


class _JumpedClient(paramiko.SSHClient):
    """An SSH client that also closes the jump host's connection under it."""

    def __init__(self, via: paramiko.SSHClient | None) -> None:
        super().__init__()
        self._via = via

    def close(self) -> None:
        super().close()
        if self._via is not None:
            self._via.close()


def _ssh_error(exc: Exception, where: str) -> Exception:
    """The one-line :class:`SSHError` for a paramiko connect failure (other errors as they
    are: a bug shows)."""
    if isinstance(exc, paramiko.BadHostKeyException):
        return SSHError(f"host key of {where} does not match known_hosts")
    if isinstance(exc, paramiko.AuthenticationException):
        return SSHError(f"authentication refused for {where}")
    if isinstance(exc, paramiko.SSHException):
        if "not found in known_hosts" in str(exc):
            return SSHError(f"{where} is not in known_hosts (add it, or pass "
                            "--accept-unknown-host)")
        return SSHError(f"SSH to {where} failed: {type(exc).__name__}")
    if isinstance(exc, OSError):
        return SSHError(f"cannot connect to {where}: {exc.strerror or exc}")
    return exc


def _load_config(path: str | Path | None) -> paramiko.SSHConfig:
    default = Path.home() / ".ssh" / "config"
    file = Path(path) if path else default
    if path is None and not file.exists():
        return paramiko.SSHConfig()
    try:
        return paramiko.SSHConfig.from_path(str(file))
    except OSError as exc:
        raise SSHError(f"cannot read the SSH config {file}: {exc.strerror}") from None


def _parse(spec: str, key_file, known_hosts, accept_unknown_host, jump, config, default_user,
           depth: int) -> SSHTarget:
    if depth > 8:
        raise SSHError(f"ProxyJump chain through {spec} is longer than 8 hops (a loop?)")
    user, _, hostport = spec.rpartition("@")
    alias, _, port = hostport.partition(":")
    entry = config.lookup(alias)
    try:
        port_number = int(port or entry.get("port", 22))
    except ValueError:
        raise SSHError(f"the port of {spec} is not a number") from None
    files = [str(Path(f).expanduser()) for f in entry.get("identityfile") or []]
    known = (entry.get("userknownhostsfile") or "").split()
    target = SSHTarget(entry.get("hostname", alias), user or entry.get("user", default_user),
                       port_number, key_file or (files[0] if files else None),
                       known_hosts or (str(Path(known[0]).expanduser()) if known else None),
                       accept_unknown_host)
    hop = jump or (entry.get("proxyjump", "").split(",")[0] or None)
    if hop and hop.lower() != "none":
        target = replace(target, jump=_parse(hop, key_file, known_hosts, accept_unknown_host,
                                             None, config, default_user, depth + 1))
    return target


class LocalForward:
    """A local port forward (OpenSSH's ``-L``) over an open SSH connection: connections to
    ``127.0.0.1:local_port`` here are carried by ``direct-tcpip`` channels to ``host:port`` as
    the remote end sees it — how ``tracer run`` reaches vLLM on a GPU node that only the login
    node can reach. A context manager: entering starts the listener (on loopback only),
    leaving closes it and every open channel.

    Parameters
    ----------
    client : paramiko.SSHClient
        The open connection (to the login node).
    host, port : str, int
        Where the remote end connects (the GPU node's vLLM).

    Attributes
    ----------
    local_port : int
        The port listened on (free, chosen by the OS).
    failures : list of str
        Channels the remote end refused to open, described without secrets.
    """

    def __init__(self, client: paramiko.SSHClient, host: str, port: int) -> None:
        self.client, self.host, self.port = client, host, port
        self.local_port = 0
        self.failures: list[str] = []
        self._listener = None
        self._open: set = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, the forwarded server's address here."""
        return f"http://127.0.0.1:{self.local_port}"

    def __enter__(self) -> LocalForward:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.local_port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="ssh-forward").start()
        return self

    def __exit__(self, *exc) -> None:
        self._listener.close()
        with self._lock:
            for endpoint in list(self._open):
                endpoint.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except OSError:                     # the listener was closed: done
                return
            try:
                channel = self.client.get_transport().open_channel(
                    "direct-tcpip", (self.host, self.port), peer, timeout=10)
            except (paramiko.SSHException, OSError, AttributeError) as exc:
                self.failures.append(f"{self.host}:{self.port} refused ({type(exc).__name__})")
                sock.close()
                continue
            threading.Thread(target=self._pump, args=(sock, channel), daemon=True).start()

    def _pump(self, sock: socket.socket, channel) -> None:
        """Copy bytes both ways until either side closes: a thread per direction, blocking
        reads (no ``select`` on the channel: paramiko's ``Channel.fileno`` makes an OS pipe
        per channel whose descriptors a closing race can free twice)."""
        with self._lock:
            self._open.update((sock, channel))
        back = threading.Thread(target=self._copy, args=(channel.recv, sock.sendall),
                                daemon=True)
        back.start()
        self._copy(sock.recv, channel.sendall)
        channel.shutdown_write()              # the client is done sending: say so, then
        back.join()                           # let the answer finish
        with self._lock:
            self._open.difference_update((sock, channel))
        channel.close()
        sock.close()

    @staticmethod
    def _copy(read, write) -> None:
        try:
            while data := read(65536):
                write(data)
        except OSError:                       # either end reset: this direction is over
            pass
