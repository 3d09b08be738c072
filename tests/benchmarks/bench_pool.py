"""A worker pool: 1,000 workers on one event loop doing trivial jobs, per job.

Each job is a coroutine that yields to the loop once. Metered three ways: a machine per
job (``@Jobs.task``), a long-lived machine per worker (``track()``), and prometheus-async's
decorators with an `Enum` (what people write today); bare coroutines are the floor. (A
bare `AsyncMachine` per worker is an order of magnitude slower: see the transition table.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import prometheus_client

from statemachine_metrics import MeteredMachine, TaskMachine

from ._harness import Table, interleaved

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


class Jobs(TaskMachine, registry=None, namespace="bench"):
    pass


async def job() -> None:
    await anyio.lowlevel.checkpoint()


async def bare_job() -> None:
    await asyncio.sleep(0)


@Jobs.task
async def task_job() -> None:
    await anyio.lowlevel.checkpoint()


def prometheus_async_job() -> Callable[[], Awaitable[None]]:
    """prometheus-async's `@time` and `@count_exceptions`, and an Enum of the job's state."""
    from prometheus_async.aio import count_exceptions, time

    seconds = prometheus_client.Histogram("pa_job_seconds", "d", registry=None)
    errors = prometheus_client.Counter("pa_job_errors", "d", registry=None)
    state = prometheus_client.Enum(
        "pa_job_state", "d", states=["pending", "running", "succeeded", "failed"], registry=None
    )

    @time(seconds)  # type: ignore[untyped-decorator]
    @count_exceptions(errors)  # type: ignore[untyped-decorator]
    async def metered() -> None:
        state.state("running")
        try:
            await asyncio.sleep(0)
        except BaseException:
            state.state("failed")
            raise
        state.state("succeeded")

    return metered  # type: ignore[no-any-return]


def pool(work: Callable[[int], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(WORKERS):
                tg.start_soon(work, i)

    return main


def jobs(run: Callable[[], Awaitable[None]]) -> Callable[[int], Awaitable[None]]:
    async def work(_: int) -> None:
        for _ in range(JOBS):
            await run()

    return work


async def tracked(i: int) -> None:
    tracker = PoolWorker(labels={"worker": str(i)}).track(
        enter="start", success="finish", error="fail"
    )
    for _ in range(JOBS):
        async with tracker:
            await job()


def asyncio_gather(run: Callable[[], Awaitable[None]]) -> Callable[[], object]:
    """The pool on plain asyncio, as a prometheus-async user writes it."""

    async def main() -> None:
        async def work() -> None:
            for _ in range(JOBS):
                await run()

        await asyncio.gather(*(work() for _ in range(WORKERS)))

    return lambda: asyncio.run(main())


def run() -> Table:
    table = Table("Worker pool: 1,000 workers, 20 trivial jobs each (per job)")
    total = WORKERS * JOBS
    floor = "bare coroutines, asyncio"
    anchor = "prometheus-async, asyncio"  # @time + @count_exceptions + an Enum
    cases: dict[str, tuple[Callable[[], object], int]] = {
        floor: (asyncio_gather(bare_job), total),
        anchor: (asyncio_gather(prometheus_async_job()), total),
    }
    for backend in ("asyncio", "trio"):
        cases[f"ours, @Jobs.task (a machine per job), {backend}"] = (
            lambda b=backend: anyio.run(pool(jobs(task_job)), backend=b),
            total,
        )
        cases[f"ours, track() on a machine per worker, {backend}"] = (
            lambda b=backend: anyio.run(pool(tracked), backend=b),
            total,
        )
    times = interleaved(cases)
    for name, seconds in times.items():
        table.add(
            name, seconds, None if name == floor else floor, anchor if "ours" in name else None
        )
    return table
