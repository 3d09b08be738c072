"""Connections to upstream peers that drop and reconnect, written in plain trio.

Machines run on anyio, so trio code uses them as they are: this program calls
`trio.run`, opens nurseries, sleeps and times out with trio's own API, and awaits the
machine's triggers like any other trio function. Each `Connection` is bound to the label
`peer="..."`; `myapp_connection_state_machines` shows how many connections are up, and
`rate(myapp_connection_state_transitions_total{trigger="lost"}[5m])` how often they drop.

Needs trio (`pip install statemachine-metrics[trio]`).

    python examples/trio_worker.py                    # http://127.0.0.1:8000/metrics
    python examples/trio_worker.py --sessions 5       # stop after 5 sessions per peer
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Sequence

import trio
from prometheus_client import start_http_server

from statemachine_metrics import MeteredMachine, Trigger

log = logging.getLogger("trio_worker")


class Connection(MeteredMachine, namespace="myapp", labelnames=("peer",)):
    """State of each connection to an upstream peer"""

    states = ["disconnected", "connecting", "connected", "closed"]
    dial = Trigger("disconnected", "connecting")
    established = Trigger("connecting", "connected")
    lost = Trigger(["connecting", "connected"], "disconnected")
    close = Trigger("*", "closed")

    # Callbacks may be plain functions or coroutines; these log each change.
    def on_enter_connected(self) -> None:
        log.info("%s: connected", self.labels["peer"])

    def on_enter_disconnected(self) -> None:
        log.info("%s: disconnected", self.labels["peer"])


class Timing:
    """How long the made-up network takes, and how long a connection attempt may take,
    in seconds times `scale` (tests make it small)."""

    def __init__(self, scale: float = 1.0, seed: int | None = None) -> None:
        self.scale = scale
        self.rng = random.Random(seed)
        self.connect_limit = scale * 0.4

    def connect(self) -> float:
        return self.scale * self.rng.uniform(0.05, 0.5)

    def session(self) -> float:
        return self.scale * self.rng.uniform(0.5, 5.0)


async def keep_connected(
    peer: str, sessions: int | None, timing: Timing, outcomes: dict[str, int]
) -> None:
    """Connect to `peer`, stay connected until the session drops, reconnect; `sessions`
    times (forever if None). A connection attempt that takes too long is lost."""
    connection = Connection(labels={"peer": peer})
    done = 0
    try:
        while sessions is None or done < sessions:
            await connection.dial()
            with trio.move_on_after(timing.connect_limit) as attempt:
                await trio.sleep(timing.connect())
            if attempt.cancelled_caught:
                outcomes["timeouts"] += 1
                await connection.lost()
                continue
            await connection.established()
            await trio.sleep(timing.session())
            await connection.lost()
            outcomes["sessions"] += 1
            done += 1
        await connection.close()
    finally:
        await connection.aclose()


async def run(
    peers: Sequence[str] = ("db", "cache", "search"),
    sessions: int | None = None,
    timing: Timing | None = None,
) -> dict[str, int]:
    """Keep a connection to each of `peers`; return the sessions and timeouts seen."""
    outcomes = {"sessions": 0, "timeouts": 0}
    timing = Timing() if timing is None else timing
    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(keep_connected, peer, sessions, timing, outcomes)
    return outcomes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--sessions", type=int, default=None, help="sessions per peer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start_http_server(args.port, addr=args.host)
    print(f"serving metrics on http://{args.host}:{args.port}/metrics (Ctrl-C stops)")
    try:
        outcomes = trio.run(lambda: run(sessions=args.sessions))
    except KeyboardInterrupt:
        print("stopped")
    else:
        print(f"{outcomes['sessions']} sessions, {outcomes['timeouts']} connection timeouts")


if __name__ == "__main__":
    main()
