"""A scrape of labelled machines, against prometheus_client `Enum`s with the same series.

Two ways to scrape machines: prometheus_client's own `generate_latest` over a registry
holding a `MachineCollector`, and the library's `generate_latest` (what `serve_metrics`
and `make_asgi_app` serve), which formats machine families itself.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from statemachine_metrics import MachineCollector, MeteredMachine, generate_latest

from ._harness import Table, interleaved

STATES = ["idle", "running", "error"]
TRANSITIONS = [["start", "idle", "running"], ["finish", "running", "idle"]]


def labelled_class() -> type[MeteredMachine]:
    class Worker(MeteredMachine, registry=None, labelnames=("worker",)):
        states = STATES
        transitions = TRANSITIONS

    return Worker


def unlabelled_class() -> type[MeteredMachine]:
    class Job(MeteredMachine, registry=None):
        states = STATES
        transitions = TRANSITIONS

    return Job


def without_gc(run: Callable[[], object]) -> Callable[[], object]:
    def scrape() -> object:
        gc.disable()
        try:
            return run()
        finally:
            gc.enable()

    return scrape


def moving_every_series(
    enum: Any, count: int, generate: Callable[[], object]
) -> Callable[[], object]:
    """A scrape after every series changed state since the last one: nothing to reuse.
    The state changes (through `enum`, the reference's or the machines' Enum) are timed
    too, alike on both sides."""
    turn = [0]

    def scrape() -> object:
        turn[0] += 1
        state = STATES[turn[0] % 2]
        for i in range(count):
            enum.labels(str(i)).state(state)
        return generate()

    return scrape


def run() -> Table:
    table = Table("Scrape, per scrape", unit="ms/op")
    for count, rounds in ((10_000, 7), (100_000, 3)):
        reference = CollectorRegistry()
        enum = prometheus_client.Enum(
            "worker_state", "d", ["worker"], states=STATES, registry=reference
        )
        for i in range(count):
            enum.labels(str(i))
        cls = labelled_class()
        machines = [cls(labels={"worker": str(i)}) for i in range(count)]
        registry = CollectorRegistry()
        registry.register(MachineCollector(cls))

        anchor = f"prometheus_client Enum, {count:,} label sets, text"
        om_anchor = f"prometheus_client Enum, {count:,} label sets, OpenMetrics"
        plain = f"prometheus_client.generate_latest, {count:,} machines, all metrics"
        ours = f"ours, generate_latest, {count:,} machines, all metrics, text"
        cases: dict[str, tuple[Callable[[], object], int]] = {
            anchor: (lambda r=reference: prometheus_client.generate_latest(r), 1),
            plain: (lambda r=registry: prometheus_client.generate_latest(r), 1),
            ours: (lambda r=registry: generate_latest(r), 1),
        }
        if count == 10_000:
            moved_anchor = f"{anchor}, every series moved since the last scrape"
            cases[moved_anchor] = (
                moving_every_series(
                    enum, count, lambda r=reference: prometheus_client.generate_latest(r)
                ),
                1,
            )
            cases[f"{plain}, every series moved since the last scrape"] = (
                moving_every_series(
                    cls.metric,
                    count,
                    lambda r=registry: prometheus_client.generate_latest(r),
                ),
                1,
            )
            cases[om_anchor] = (lambda r=reference: openmetrics_latest(r), 1)
            cases[f"ours, generate_latest, {count:,} machines, all metrics, OpenMetrics"] = (
                lambda r=registry: generate_latest(r, openmetrics=True),
                1,
            )
        else:
            # The garbage collector walks every object a scrape allocates; prometheus_client's
            # scrapes allocate several per sample.
            cases[f"{plain}, garbage collector off"] = (
                without_gc(lambda r=registry: prometheus_client.generate_latest(r)),
                1,
            )
        times = interleaved(cases, rounds=rounds)
        for name, seconds in times.items():
            if name in (anchor, om_anchor) or name.startswith(f"{anchor}, "):
                table.add(name, seconds)
            elif "OpenMetrics" in name:
                table.add(name, seconds, om_anchor)
            elif "moved" in name:
                table.add(name, seconds, f"{anchor}, every series moved since the last scrape")
            else:
                table.add(name, seconds, anchor)
        del machines

    for count in (10, 1_000_000):
        cls = unlabelled_class()
        machines = [cls() for _ in range(count)]
        registry = CollectorRegistry()
        registry.register(MachineCollector(cls))
        times = interleaved(
            {
                f"prometheus_client.generate_latest, {count:,} unlabelled machines": (
                    lambda r=registry: prometheus_client.generate_latest(r),
                    1,
                ),
                f"ours, generate_latest, {count:,} unlabelled machines": (
                    lambda r=registry: generate_latest(r),
                    1,
                ),
            }
        )
        for name, seconds in times.items():
            table.add(name, seconds)
        del machines
    return table
