"""The Prometheus `Enum` reference's real-world example, done with a machine class.

The reference (see docs/enum.md) tracks a background worker with an `Enum` that the code
sets by hand: `state("running")`, `state("error")`, `state("idle")`. Here the worker is a
`MeteredMachine`. It exposes the same metric, `myapp_worker_state`, line for line, plus how
many workers are in each state, every transition that ran, the time spent in each state
and the triggers that raised. And the code can no longer set a state that makes no sense:
finishing a job that never started is a `MachineError`, not a wrong metric.

One difference in behaviour, on purpose: the reference sets `error` and then, in its
`finally`, `idle` straight away, so a scrape almost never sees `error`. This worker stays
in `error` while it backs off, and `myapp_worker_state_transitions_total` counts every
failure whether a scrape saw it or not.

    python examples/reference_worker.py              # metrics on http://127.0.0.1:8000/metrics
    python examples/reference_worker.py --jobs 20    # stop after 20 jobs
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import anyio
from prometheus_client import start_http_server

from statemachine_metrics import MeteredMachine, Trigger


class Worker(MeteredMachine, namespace="myapp"):
    """Current state of the background worker"""

    states = ["idle", "running", "error"]
    start = Trigger("idle", "running")
    finish = Trigger("running", "idle")
    fail = Trigger("running", "error")
    recover = Trigger("error", "idle")


class JobFailed(Exception):
    """A job that did not work out."""


async def made_up_job(seconds: float, fails: bool) -> None:
    """Stands for real work."""
    await anyio.sleep(seconds)
    if fails:
        raise JobFailed("job failed")


async def process_job(worker: Worker, job: Callable[[], Awaitable[None]]) -> None:
    """Run one job: `running` while it runs, then `idle`, or `error` if it raised."""
    await worker.start()
    try:
        await job()
    except Exception:
        await worker.fail()
        raise
    await worker.finish()


async def run(
    jobs: int | None = None,
    *,
    failure_rate: float = 0.1,
    job_seconds: tuple[float, float] = (0.2, 1.0),
    backoff: float = 0.5,
    seed: int | None = None,
) -> dict[str, int]:
    """Process `jobs` made-up jobs (forever if None); return how many finished and failed."""
    rng = random.Random(seed)
    worker = Worker()
    outcomes = {"finished": 0, "failed": 0}
    done = 0
    while jobs is None or done < jobs:
        job = partial(made_up_job, rng.uniform(*job_seconds), rng.random() < failure_rate)
        try:
            await process_job(worker, job)
        except JobFailed:
            outcomes["failed"] += 1
            await anyio.sleep(backoff)  # in `error` meanwhile
            await worker.recover()
        else:
            outcomes["finished"] += 1
        done += 1
    return outcomes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--jobs", type=int, default=None, help="stop after this many jobs")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args(argv)
    start_http_server(args.port, addr=args.host)
    print(f"serving metrics on http://{args.host}:{args.port}/metrics (Ctrl-C stops)")
    try:
        outcomes = anyio.run(lambda: run(args.jobs), backend=args.backend)
    except KeyboardInterrupt:
        print("stopped")
    else:
        print(f"{outcomes['finished']} jobs finished, {outcomes['failed']} failed")


if __name__ == "__main__":
    main()
