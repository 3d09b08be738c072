"""A connection whose states time out: give up connecting, retry later, drop when idle.

The upstream is made up: the first handshakes hang, a later one succeeds. The
`Connection` machine declares what must not last: `connecting` gives up after
CONNECT_TIMEOUT, `failed` retries after BACKOFF, and `connected` closes after IDLE unless
heartbeats (a reflexive transition) keep it alive. The timers run while the machine is
entered with `async with`. The program prints the states the connection went through.
docs/how-to/time-out-a-state.md explains it.

    python examples/state_timeout.py
    python examples/state_timeout.py --backend trio
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import anyio
from prometheus_client import CollectorRegistry

from statemachine_metrics import MachineCollector, MachineError, MeteredMachine, Trigger

# A registry of its own, so that importing this module (as the tests do) never clashes
# with other metrics; a service would use prometheus_client.REGISTRY.
REGISTRY = CollectorRegistry()

# Seconds; a real service would use 10, 30 and 300. Short here, so that the program (and
# its test) runs in a fraction of a second.
CONNECT_TIMEOUT = 0.05
BACKOFF = 0.02
IDLE = 0.08
HANDSHAKE_LIMIT = 0.07  # how long the code waits for a handshake, see handshake()

STATES = ("disconnected", "connecting", "connected", "failed")


class Connection(MeteredMachine, namespace="myapp", registry=None):
    """State of the upstream connection"""

    states = [{"name": state, "on_enter": "entered"} for state in STATES]
    connect = Trigger("disconnected", "connecting")
    established = Trigger("connecting", "connected")
    give_up = Trigger("connecting", "failed")
    retry = Trigger("failed", "disconnected")
    heartbeat = Trigger("connected", "connected")
    drop = Trigger("connected", "disconnected")
    timeouts = {
        "connecting": (CONNECT_TIMEOUT, "give_up"),
        "failed": (BACKOFF, "retry"),
        "connected": (IDLE, "drop"),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = [self.state]
        self._moved = anyio.Event()

    def entered(self) -> None:
        self.path.append(self.state)
        self._moved.set()
        self._moved = anyio.Event()

    async def wait_for(self, state: str) -> None:
        """Wait until the machine is in `state` (a timeout may be what moves it)."""
        while self.state != state:
            await self._moved.wait()


REGISTRY.register(MachineCollector(Connection))


async def handshake(conn: Connection, seconds: float) -> None:
    """The made-up handshake takes `seconds`; the code gives up after HANDSHAKE_LIMIT.

    The machine's own timeout (CONNECT_TIMEOUT) fires first and records the failure;
    the cancel scope stops the waiting code. One keeps the state honest, the other keeps
    the code from waiting forever.
    """
    with anyio.move_on_after(HANDSHAKE_LIMIT):
        await anyio.sleep(seconds)
        # Too late if the timeout gave up first: the machine says so with MachineError.
        with suppress(MachineError):
            await conn.established()


async def main(handshakes: Sequence[float] = (1.0, 1.0, 0.001), heartbeats: int = 3) -> list[str]:
    """Connect, retrying until a handshake succeeds; send heartbeats, then go quiet until
    the idle timeout drops the connection. Return the states it went through."""
    async with Connection() as conn:
        for seconds in handshakes:
            await conn.connect()
            await handshake(conn, seconds)
            if conn.state == "connected":
                break
            await conn.wait_for("disconnected")  # give_up, then retry after BACKOFF
        for _ in range(heartbeats):
            await anyio.sleep(IDLE / 4)
            await conn.heartbeat()
        await conn.wait_for("disconnected")  # nothing to say: dropped after IDLE
    return conn.path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    print(" -> ".join(anyio.run(main, backend=args.backend)))
