"""Many live machines: transitions on machines picked at random, 1,000 against 1,000,000.

With a million machines, each transition touches a machine (and its label set) that is
most likely not in the CPU's caches any more. The hand-written floor, a million small
objects, shows what that costs without any library.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import anyio

from statemachine_metrics import MeteredMachine

from ._harness import Table, interleaved
from .bench_transition import Floor

N = 20_000
STATES = ["idle", "running"]
TRANSITIONS = [["start", "idle", "running"], ["finish", "running", "idle"]]


class Worker(MeteredMachine, registry=None, labelnames=("worker",)):
    states = STATES
    transitions = TRANSITIONS


def picks(count: int) -> list[int]:
    rng = random.Random(count)
    return [rng.randrange(count) for _ in range(N // 2)]


def ours(machines: list[Worker]) -> Callable[[], Awaitable[None]]:
    chosen = picks(len(machines))

    async def loop() -> None:
        for i in chosen:
            machine = machines[i]
            await machine.start()  # type: ignore[attr-defined]
            await machine.finish()  # type: ignore[attr-defined]

    return loop


def floor(floors: list[Floor]) -> Callable[[], Awaitable[None]]:
    chosen = picks(len(floors))

    async def loop() -> None:
        for i in chosen:
            fire = floors[i].fire
            await fire("start")
            await fire("finish")

    return loop


def on_asyncio(loop: Callable[[], Awaitable[None]]) -> Callable[[], object]:
    return lambda: anyio.run(loop, backend="asyncio")


def run() -> Table:
    table = Table("Random access to many live machines, per transition")
    cases: dict[str, tuple[Callable[[], object], int]] = {}
    kept: list[object] = []
    for count in (1_000, 1_000_000):
        machines = [Worker(labels={"worker": str(i)}) for i in range(count)]
        floors = [Floor() for _ in range(count)]
        kept += [machines, floors]
        cases[f"floor, {count:,} objects"] = (
            on_asyncio(floor(floors)),
            N,
        )
        cases[f"ours, {count:,} labelled machines"] = (
            on_asyncio(ours(machines)),
            N,
        )
    times = interleaved(cases)
    for name, seconds in times.items():
        if name.startswith("floor, 1,000 "):
            table.add(name, seconds)
        elif name.startswith("ours, 1,000 ") or name.startswith("floor"):
            table.add(name, seconds, "floor, 1,000 objects")
        else:
            table.add(name, seconds, "ours, 1,000 labelled machines", "floor, 1,000,000 objects")
    del kept
    return table
