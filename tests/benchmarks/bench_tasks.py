"""Decorated jobs on each backend: bare, prometheus-async, ``track()``, ``@task``.

The worker pool of `bench_pool` (1,000 workers, 20 trivial jobs each), with every
contender run the same way, through anyio on asyncio and on trio, so that each backend's
ratios compare decorations alone: the bare job (one checkpoint) is the floor,
prometheus-async's ``@time`` and ``@count_exceptions`` with an ``Enum`` the anchor, then
the job decorated by ``worker.track()`` (a machine per worker) and by ``@Jobs.task`` (a
machine per call). Runs are interleaved round by round; each case's median is per job.
``python -m tests.benchmarks tasks``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import prometheus_client

from . import bench_pool
from ._harness import Table, interleaved
from .bench_pool import JOBS, WORKERS, Jobs, PoolWorker, job, jobs, pool

BACKENDS = ("asyncio", "trio")
FLOOR = "bare job"
ANCHOR = "prometheus-async @time + @count_exceptions + Enum"
TRACK = "track() on a machine per worker"
TASK = "@Jobs.task, a machine per call"


def prometheus_async_job() -> Callable[[], Awaitable[None]]:
    """`bench_pool`'s prometheus-async job, yielding through anyio (it runs on trio too)."""
    from prometheus_async.aio import count_exceptions, time

    seconds = prometheus_client.Histogram("pa_task_seconds", "d", registry=None)
    errors = prometheus_client.Counter("pa_task_errors", "d", registry=None)
    state = prometheus_client.Enum(
        "pa_task_state", "d", states=["pending", "running", "succeeded", "failed"], registry=None
    )

    @time(seconds)
    @count_exceptions(errors)
    async def metered() -> None:
        state.state("running")
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException:
            state.state("failed")
            raise
        state.state("succeeded")

    return metered


async def tracked(i: int) -> None:
    worker = PoolWorker(labels={"worker": str(i)})
    metered = worker.track(enter="start", success="finish", error="fail")(job)
    for _ in range(JOBS):
        await metered()
    await worker.aclose()


CASES: dict[str, Callable[[int], Awaitable[None]]] = {
    FLOOR: jobs(job),
    ANCHOR: jobs(prometheus_async_job()),
    TRACK: tracked,
    TASK: jobs(Jobs.task(job)),
}


def measure(
    rounds: int = 5,
    backends: tuple[str, ...] = BACKENDS,
    workers: int = WORKERS,
    jobs: int | None = None,
) -> dict[str, float]:
    """Seconds per job of every case on each of `backends` (``"<case>, <backend>"``), with
    `workers` workers sharing the pool's 20,000 jobs, or doing `jobs` jobs each."""
    global JOBS
    kept = bench_pool.WORKERS, bench_pool.JOBS, JOBS
    bench_pool.WORKERS = workers
    bench_pool.JOBS = WORKERS * JOBS // workers if jobs is None else jobs
    JOBS = bench_pool.JOBS
    try:

        def on(backend: str, work: Callable[[int], Awaitable[None]]) -> Callable[[], object]:
            main = pool(work)
            return lambda: anyio.run(main, backend=backend)

        cases = {
            f"{name}, {backend}": (on(backend, work), workers * JOBS)
            for backend in backends
            for name, work in CASES.items()
        }
        return interleaved(cases, rounds)
    finally:
        bench_pool.WORKERS, bench_pool.JOBS, JOBS = kept


def run() -> Table:
    times = measure()
    table = Table("Decorated jobs through anyio, per backend: 1,000 workers, 20 jobs each")
    for backend in BACKENDS:
        floor, anchor = f"{FLOOR}, {backend}", f"{ANCHOR}, {backend}"
        table.add(floor, times[floor])
        table.add(anchor, times[anchor], floor)
        for name in (TRACK, TASK):
            table.add(f"{name}, {backend}", times[f"{name}, {backend}"], anchor, floor)
    table.add(f"{TASK}, trio against asyncio", times[f"{TASK}, trio"], f"{TASK}, asyncio")
    # The same 20,000 jobs on 10 workers: 10 live tasks and machines instead of 1,000,
    # all of them in the CPU's caches.
    few = measure(backends=("asyncio",), workers=10)
    small = Table("The same jobs on 10 workers, 2,000 jobs each (asyncio)")
    floor, anchor = f"{FLOOR}, asyncio", f"{ANCHOR}, asyncio"
    small.add(floor, few[floor])
    small.add(anchor, few[anchor], floor)
    for name in (TRACK, TASK):
        small.add(f"{name}, asyncio", few[f"{name}, asyncio"], anchor, floor)
    return table.then(small).then(split(times))


def split(times: dict[str, float]) -> Table:
    """The 1,000-worker times (asyncio) taken apart, from pools of 1 and of `JOBS` jobs per
    worker: per job t(n) = setup / n + job, so one job is ``(JOBS t(JOBS) - t(1)) /
    (JOBS - 1)`` and a worker's setup (its task, and its machine, decoration and close)
    is ``t(1) - job``."""
    once = measure(backends=("asyncio",), jobs=1)
    table = Table("The 1,000-worker jobs taken apart: one more job, and a worker's setup")
    job: dict[str, float] = {}
    for name in (FLOOR, ANCHOR, TRACK, TASK):
        case = f"{name}, asyncio"
        job[name] = (JOBS * times[case] - once[case]) / (JOBS - 1)
    for name in (FLOOR, ANCHOR, TRACK, TASK):
        row = f"one job: {name}, asyncio"
        table.add(
            row, job[name], *((f"one job: {ANCHOR}, asyncio",) if name in (TRACK, TASK) else ())
        )
    for name in (FLOOR, ANCHOR, TRACK, TASK):
        case = f"{name}, asyncio"
        table.add(f"a worker's setup: {name}, asyncio", once[case] - job[name])
    return table


if __name__ == "__main__":
    print(run().render())
