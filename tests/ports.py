"""Free TCP ports on 127.0.0.1 for the servers tests start (Ray heads, MLflow, torchrun's rendezvous).

Asking the kernel for port 0 and closing the socket is racy twice over: two calls can return the same port,
and every outgoing connection also draws its local port from the same ephemeral range, so between the probe
and the server's bind a Ray process can take the port (CI saw the dashboard fail with EADDRINUSE that way).
So the ports are drawn below the ephemeral range (and above Ray's worker-port range 10002–19999), all of a
request held open together so they are distinct.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RAY_WORKER_PORTS_END = 19999
_rng = random.SystemRandom()  # the tests' seeded global RNG stays untouched


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were bindable on 127.0.0.1 a moment ago, outside the ephemeral range."""
    lo, hi = _RAY_WORKER_PORTS_END + 1, _ephemeral_start() - 1
    if hi - lo < 10 * n:  # an unusual ephemeral range: fall back to the kernel's choice
        lo, hi = 0, 0
    held: list[socket.socket] = []
    try:
        tries = 0
        while len(held) < n:
            tries += 1
            if tries > 1000 * n:
                raise RuntimeError(f"no {n} free ports found in {lo}–{hi}")
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", _rng.randint(lo, hi) if hi else 0))
            except OSError:
                s.close()
                continue
            held.append(s)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]
