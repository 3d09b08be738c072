"""`Enum.state()`: ours against prometheus_client's, with few and many states."""

from __future__ import annotations

import prometheus_client

from statemachine_metrics import Enum

from ._harness import Table, median_time

N = 200_000


def run() -> Table:
    table = Table("Enum.state(), one call")
    for count in (3, 50):
        states = [f"s{i}" for i in range(count)]
        last = states[-1]
        theirs = prometheus_client.Enum("e", "d", states=states, registry=None)
        ours = Enum("e", "d", states=states, registry=None)

        def loop(metric: Enum | prometheus_client.Enum, last: str = last) -> None:
            state = metric.state
            for _ in range(N):
                state(last)

        anchor = f"prometheus_client, {count} states"
        table.add(anchor, median_time(lambda m=theirs: loop(m), N))
        table.add(f"ours, {count} states", median_time(lambda m=ours: loop(m), N), anchor)
    return table
