"""An end-to-end worker pool: 1,000 workers on one event loop doing trivial jobs."""

from __future__ import annotations

import asyncio
import time

import anyio
import anyio.lowlevel
from transitions.extensions.asyncio import AsyncMachine

from statemachine_metrics import MeteredMachine

from ._harness import Table

WORKERS = 1_000
JOBS = 20  # per worker
STATES = ["idle", "running", "error"]
TRANSITIONS = [
    ["start", "idle", "running"],
    ["finish", "running", "idle"],
    ["fail", "running", "error"],
    ["reset", "error", "idle"],
]


class PoolWorker(MeteredMachine, registry=None, labelnames=("worker",)):
    states = STATES
    transitions = TRANSITIONS


async def job() -> None:
    await anyio.lowlevel.checkpoint()


async def ours() -> None:
    async def work(worker: PoolWorker) -> None:
        tracked = worker.track(enter="start", success="finish", error="fail")
        for _ in range(JOBS):
            async with tracked:
                await job()

    async with anyio.create_task_group() as tg:
        for i in range(WORKERS):
            tg.start_soon(work, PoolWorker(labels={"worker": str(i)}))


async def bare() -> None:
    class Model:
        pass

    async def work(model: object) -> None:
        for _ in range(JOBS):
            await model.start()  # type: ignore[attr-defined]
            try:
                await job()
            except Exception:
                await model.fail()  # type: ignore[attr-defined]
                raise
            await model.finish()  # type: ignore[attr-defined]

    models = []
    for _ in range(WORKERS):
        model = Model()
        AsyncMachine(model=model, states=STATES, transitions=TRANSITIONS, initial="idle")
        models.append(model)
    async with anyio.create_task_group() as tg:
        for model in models:
            tg.start_soon(work, model)


def jobs_per_second(run: object, backend: str = "asyncio") -> float:
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        if backend == "asyncio-native":
            asyncio.run(run())  # type: ignore[operator]
        else:
            anyio.run(run, backend=backend)  # type: ignore[arg-type]
        best = max(best, WORKERS * JOBS / (time.perf_counter() - start))
    return best


def run() -> Table:
    table = Table("Worker pool: 1,000 workers, 20 trivial jobs each (seconds per job)")
    anchor = "bare transitions AsyncMachine, no metrics, asyncio"
    table.add(anchor, 1 / jobs_per_second(bare, "asyncio-native"))
    table.add("ours with track() and all metrics, asyncio", 1 / jobs_per_second(ours), anchor)
    table.add("ours with track() and all metrics, trio", 1 / jobs_per_second(ours, "trio"), anchor)
    return table
