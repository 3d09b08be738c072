"""Scraping (`generate_latest`) machines, against a prometheus_client Enum with the same series."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest

from statemachine_metrics import MachineCollector, MeteredMachine

from ._harness import Table, median_time

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


def scrape_time(registry: CollectorRegistry) -> float:
    return median_time(lambda: generate_latest(registry), 1, repeats=5)


def run() -> Table:
    table = Table("Scrape (generate_latest), per scrape", unit="ms/op")
    for count in (10_000, 100_000):
        reference = CollectorRegistry()
        enum = prometheus_client.Enum(
            "worker_state", "d", ["worker"], states=STATES, registry=reference
        )
        for i in range(count):
            enum.labels(str(i))
        anchor = f"prometheus_client Enum, {count:,} label sets"
        table.add(anchor, scrape_time(reference))

        cls = labelled_class()
        machines = [cls(labels={"worker": str(i)}) for i in range(count)]
        enum_only = CollectorRegistry()
        enum_only.register(cls.metric)
        table.add(f"ours, Enum of {count:,} machines", scrape_time(enum_only), anchor)
        everything = CollectorRegistry()
        everything.register(MachineCollector(cls))
        table.add(f"ours, all metrics of {count:,} machines", scrape_time(everything), anchor)
        del machines

    for count in (10, 1_000_000):
        cls = unlabelled_class()
        machines = [cls() for _ in range(count)]
        registry = CollectorRegistry()
        registry.register(MachineCollector(cls))
        table.add(f"ours, all metrics of {count:,} unlabelled machines", scrape_time(registry))
        del machines
    return table
