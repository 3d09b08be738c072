"""Creating machines and their memory, ours against transitions' ways of doing it."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

from transitions.extensions.asyncio import AsyncMachine

from statemachine_metrics import MeteredMachine

from ._harness import Table, median_time

STATES = ["idle", "running", "error"]
TRANSITIONS = [
    ["start", "idle", "running"],
    ["finish", "running", "idle"],
    ["fail", ["idle", "running"], "error"],
    ["reset", "error", "idle"],
]


class Worker(MeteredMachine, registry=None, labelnames=("worker",)):
    states = STATES
    transitions = TRANSITIONS


class Model:
    pass


def ours(count: int) -> list[object]:
    return [Worker(labels={"worker": str(i)}) for i in range(count)]


def machine_per_object(count: int) -> list[object]:
    models = []
    for _ in range(count):
        model = Model()
        AsyncMachine(model=model, states=STATES, transitions=TRANSITIONS, initial="idle")
        models.append(model)
    return models


def shared_machine(count: int) -> list[object]:
    machine = AsyncMachine(model=None, states=STATES, transitions=TRANSITIONS, initial="idle")
    models = [Model() for _ in range(count)]
    for model in models:
        machine.add_model(model)
    return models


def bytes_per_machine(make: Callable[[int], list[object]], count: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = make(count)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    return (after - before) / count


def run() -> Table:
    table = Table("Creating a machine (one label each), per machine")
    anchor = "transitions AsyncMachine per object"
    table.add(anchor, median_time(lambda: machine_per_object(2_000), 2_000, repeats=3))
    table.add(
        "add_model on a shared AsyncMachine, 5,000 models",
        median_time(lambda: shared_machine(5_000), 5_000, repeats=3),
        anchor,
    )
    table.add(
        "add_model on a shared AsyncMachine, 20,000 models",
        median_time(lambda: shared_machine(20_000), 20_000, repeats=3),
        anchor,
    )
    table.add("ours, 100,000 machines", median_time(lambda: ours(100_000), 100_000), anchor)

    memory = Table("Memory per live idle machine (tracemalloc)", unit="bytes")
    base = "transitions AsyncMachine per object"
    memory.add(base, bytes_per_machine(machine_per_object, 2_000))
    memory.add(
        "add_model on a shared AsyncMachine", bytes_per_machine(shared_machine, 10_000), base
    )
    memory.add("ours, one label each", bytes_per_machine(ours, 100_000), base)
    return table.then(memory)
