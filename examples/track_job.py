"""Background workers whose jobs are tracked by their state machines.

Each worker takes jobs from a queue. `worker.track(...)` moves it idle -> running -> idle
around each job, to error when a job fails (the worker pauses, then resets), and back to
idle when a job is abandoned because the program is stopped. While it runs,
`myapp_worker_state{worker="w1"}` shows each worker's state (pass --port to serve it);
at the end the program prints the metrics, whose transitions count the jobs that
succeeded and failed. docs/how-to/track-a-job.md explains it.

    python examples/track_job.py
    python examples/track_job.py --jobs 50 --workers 3 --port 8000 --backend trio
"""

from __future__ import annotations

import argparse

import anyio
from anyio.abc import ObjectReceiveStream
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from statemachine_metrics import MachineCollector, MeteredMachine, Trigger

# A registry of its own, so that importing this module (as the tests do) never clashes
# with other metrics; a service would use prometheus_client.REGISTRY.
REGISTRY = CollectorRegistry()


class Worker(MeteredMachine, namespace="myapp", labelnames=("worker",), registry=None):
    """Current state of the background worker"""

    states = ["idle", "running", "error"]
    start = Trigger("idle", "running")
    finish = Trigger("running", "idle")
    fail = Trigger("running", "error")
    abandon = Trigger("running", "idle")
    reset = Trigger("error", "idle")


REGISTRY.register(MachineCollector(Worker))


class JobFailed(Exception):
    pass


async def work(name: str, jobs: ObjectReceiveStream[int], pause: float) -> None:
    """Run jobs until the queue is closed; a failed job leaves the worker in error for
    `pause` seconds."""
    async with Worker(labels={"worker": name}) as worker:

        @worker.track(enter="start", success="finish", error="fail", cancel="abandon")
        async def process(job: int) -> None:
            await anyio.sleep(pause)  # ... the real work ...
            if job % 5 == 4:
                raise JobFailed(f"job {job} failed")

        async with jobs:
            async for job in jobs:
                try:
                    await process(job)
                except JobFailed as exc:
                    print(f"{name}: {exc}")
                    await anyio.sleep(pause)  # the error shows in a scrape or two
                    await worker.reset()


async def main(jobs: int = 10, workers: int = 2, pause: float = 0.01) -> str:
    """Run `jobs` jobs on `workers` workers; return the metrics in the text format."""
    send, receive = anyio.create_memory_object_stream[int]()
    async with anyio.create_task_group() as group:
        for i in range(workers):
            group.start_soon(work, f"w{i + 1}", receive.clone(), pause)
        receive.close()
        async with send:
            for job in range(jobs):
                await send.send(job)
    return generate_latest(REGISTRY).decode()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds per job")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--port", type=int, help="serve /metrics on this port while running")
    args = parser.parse_args()
    if args.port:
        start_http_server(args.port, registry=REGISTRY)
    print(anyio.run(main, args.jobs, args.workers, args.pause, backend=args.backend))
