"""One async transition between two leaves nested 1, 3 and 6 levels deep.

The leaves ``idle`` and ``running`` sit inside a chain of compound states ``l1 { l2 { ...
} }``; ``start`` is declared on the leaf, ``finish`` on the outermost compound state (so
the engine finds it through the leaf's ancestors). Ours compiles the hierarchy at class
creation, so the cost should not grow with depth; transitions' `HierarchicalAsyncMachine`
resolves it on every trigger.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import anyio
from transitions.extensions.asyncio import HierarchicalAsyncMachine

from statemachine_metrics import MeteredMachine

from ._harness import Table, median_time

N = 10_000
DEPTHS = (1, 3, 6)


def definition(depth: int) -> tuple[list[Any], list[list[str]], str]:
    """States, transitions and the leaves' common prefix for a chain `depth` deep."""
    states: list[Any] = ["idle", "running"]
    for level in range(depth, 0, -1):
        states = [
            {
                "name": f"l{level}",
                "initial": "idle" if level == depth else f"l{level + 1}",
                "children": states,
            }
        ]
    prefix = "_".join(f"l{level}" for level in range(1, depth + 1))
    transitions = [
        ["start", f"{prefix}_idle", f"{prefix}_running"],
        ["finish", "l1", f"{prefix}_idle"],
    ]
    return states, transitions, prefix


def nested_class(depth: int) -> type[MeteredMachine]:
    states, transitions, _ = definition(depth)
    body = {"states": states, "transitions": transitions}
    return type(f"Nested{depth}", (MeteredMachine,), body, registry=None)


class Flat(MeteredMachine, registry=None):
    states = ["idle", "running"]
    transitions = [["start", "idle", "running"], ["finish", "running", "idle"]]


async def ours(cls: type[MeteredMachine]) -> None:
    machine: Any = cls()
    start, finish = machine.start, machine.finish
    for _ in range(N // 2):
        await start()
        await finish()


async def reference(depth: int) -> None:
    class Model:
        pass

    model: Any = Model()
    states, transitions, _ = definition(depth)
    HierarchicalAsyncMachine(
        model=model, states=states, transitions=transitions, initial="l1", auto_transitions=False
    )
    start, finish = model.start, model.finish
    for _ in range(N // 2):
        await start()
        await finish()


def run() -> Table:
    table = Table("Nested transition (start/finish between two leaves, per transition)")
    flat = "ours, flat, asyncio"
    table.add(flat, median_time(lambda: anyio.run(ours, Flat), N, repeats=5))
    for depth in DEPTHS:
        cls = nested_class(depth)
        for backend in ("asyncio", "trio"):
            table.add(
                f"ours, depth {depth}, {backend}",
                median_time(functools.partial(anyio.run, ours, cls, backend=backend), N, repeats=5),
                flat,
            )
        table.add(
            f"HierarchicalAsyncMachine, depth {depth}, asyncio",
            median_time(lambda d=depth: asyncio.run(reference(d)), N, repeats=3),
            flat,
        )
    return table
