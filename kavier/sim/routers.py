"""Routers: which replica serves a request (one interface, reproducible across processes)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kavier.sim.prefix import stable_hash


class Router:
    """Picks a replica for each arriving request.

    Parameters
    ----------
    name : {"round-robin", "least-outstanding", "prefix-affinity"}
        ``round-robin`` cycles through the replicas in arrival order; ``least-outstanding``
        takes the replica with the fewest requests waiting or running (lowest index on ties);
        ``prefix-affinity`` sends requests of one session — or, without sessions, with the
        same first prompt block — to the same replica (a stable 64-bit hash modulo the
        replica count, so a session's prefix stays in one KV pool), and falls back to
        least-outstanding for requests with neither.
    replicas : int
    sessions : ndarray or None
        Session id of every request (ints or strings).
    first_block : callable or None
        ``first_block(i)`` → bytes of request ``i``'s first prompt block, or None.
    """

    def __init__(self, name: str, replicas: int, sessions: np.ndarray | None = None,
                 first_block: Callable[[int], bytes | None] | None = None) -> None:
        self.name, self.replicas = name, replicas
        self.sessions, self.first_block = sessions, first_block
        self._routed = 0

    def pick(self, i: int, outstanding: list[int]) -> int:
        """Replica for request ``i`` given each replica's outstanding requests."""
        self._routed += 1
        if self.replicas == 1:
            return 0
        if self.name == "round-robin":
            return (self._routed - 1) % self.replicas
        fixed = self.fixed(i)
        if fixed is not None:
            return fixed
        return min(range(self.replicas), key=lambda k: (outstanding[k], k))

    def fixed(self, i: int) -> int | None:
        """The replica ``prefix-affinity`` sends request ``i`` to whatever the load (its
        session's or first block's hash), or None (other routers, or neither key)."""
        if self.name != "prefix-affinity":
            return None
        key = None
        if self.sessions is not None:
            key = b"session" + str(self.sessions[i]).encode()
        elif self.first_block is not None:
            key = self.first_block(i)
        return None if key is None else stable_hash(key) % self.replicas
