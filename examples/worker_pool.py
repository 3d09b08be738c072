"""A pool of workers taking jobs from a queue, each worker a machine with its own label.

Every worker is a `PoolWorker` bound to the label `worker="w0"`, `"w1"`, ...: the `Enum`
shows each worker's state, `myapp_pool_worker_state_machines` how many workers are in
each state, and `myapp_pool_worker_state_duration_seconds` how long jobs take (time in
`busy`) and how long workers wait for work (time in `waiting`). When the queue is closed
the workers stop and their machines close, so their series leave `/metrics`.

    python examples/worker_pool.py                        # http://127.0.0.1:8000/metrics
    python examples/worker_pool.py --workers 8 --jobs 100
"""

from __future__ import annotations

import argparse
import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from prometheus_client import start_http_server

from statemachine_metrics import MeteredMachine, Trigger


class PoolWorker(MeteredMachine, namespace="myapp", labelnames=("worker",)):
    """State of each worker of the pool"""

    states = ["waiting", "busy", "backoff", "stopped"]
    take = Trigger("waiting", "busy")
    done = Trigger("busy", "waiting")
    fail = Trigger("busy", "backoff")
    retry = Trigger("backoff", "waiting")
    stop = Trigger("waiting", "stopped")


@dataclass(frozen=True)
class Job:
    """Stands for real work: takes `seconds`, then raises if `fails`."""

    number: int
    seconds: float
    fails: bool = False

    async def run(self) -> None:
        await anyio.sleep(self.seconds)
        if self.fails:
            raise RuntimeError(f"job {self.number} failed")


async def work(
    worker: PoolWorker,
    jobs: MemoryObjectReceiveStream[Job],
    outcomes: dict[str, int],
    backoff: float,
) -> None:
    """Take jobs until the queue is closed and empty, then stop; close the machine."""
    async with worker, jobs:
        async for job in jobs:
            await worker.take()
            try:
                await job.run()
            except Exception:
                outcomes["failed"] += 1
                await worker.fail()
                await anyio.sleep(backoff)
                await worker.retry()
            else:
                outcomes["done"] += 1
                await worker.done()
        await worker.stop()


async def run_pool(jobs: Iterable[Job], workers: int = 4, backoff: float = 0.5) -> dict[str, int]:
    """Run `jobs` on a pool of `workers`; return how many were done and failed."""
    outcomes = {"done": 0, "failed": 0}
    send, receive = anyio.create_memory_object_stream[Job]()
    async with anyio.create_task_group() as tg:
        with receive:
            for n in range(workers):
                worker = PoolWorker(labels={"worker": f"w{n}"})
                tg.start_soon(work, worker, receive.clone(), outcomes, backoff)
        async with send:
            for job in jobs:
                await send.send(job)
    return outcomes


def made_up_jobs(
    count: int | None,
    failure_rate: float = 0.05,
    seconds: tuple[float, float] = (0.1, 2.0),
    seed: int | None = None,
) -> Iterator[Job]:
    """`count` jobs of random length, a few of which fail (endless if `count` is None)."""
    rng = random.Random(seed)
    numbers = itertools.count() if count is None else range(count)
    for n in numbers:
        yield Job(n, rng.uniform(*seconds), rng.random() < failure_rate)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=None, help="stop after this many jobs")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args(argv)
    start_http_server(args.port, addr=args.host)
    print(f"serving metrics on http://{args.host}:{args.port}/metrics (Ctrl-C stops)")
    jobs = made_up_jobs(args.jobs)
    try:
        outcomes = anyio.run(lambda: run_pool(jobs, args.workers), backend=args.backend)
    except KeyboardInterrupt:
        print("stopped")
    else:
        print(f"{outcomes['done']} jobs done, {outcomes['failed']} failed")


if __name__ == "__main__":
    main()
