"""Worker processes run machines; the parent prints (or serves) their merged metrics.

This is prometheus_client's multiprocess setup, the one gunicorn or uvicorn workers use:
``PROMETHEUS_MULTIPROC_DIR`` names a directory every worker writes its metric values to,
and whoever answers scrapes merges them with `MultiProcessCollector`.

    python examples/multiprocess_workers.py               # print the merged metrics once
    python examples/multiprocess_workers.py --serve 8000  # serve them until Ctrl-C

Without ``PROMETHEUS_MULTIPROC_DIR`` in the environment, a temporary directory is used.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from multiprocessing.synchronize import Event

import anyio
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.multiprocess import (
    MultiProcessCollector,
    # prometheus_client leaves its parameters unannotated.
    mark_process_dead,  # pyright: ignore[reportUnknownVariableType]
)

from statemachine_metrics import MeteredMachine, Trigger


class Connection(MeteredMachine, namespace="example", labelnames=("conn",)):
    """State of a pooled connection"""

    states = ["idle", "busy", "broken"]
    acquire = Trigger("idle", "busy")
    release = Trigger("busy", "idle")
    fail = Trigger("busy", "broken")
    repair = Trigger("broken", "idle")
    duration_buckets = (0.001, 0.01, 0.1)


async def serve_jobs(number: int) -> list[Connection]:
    """Run a worker's jobs over its pool; two connections stay busy at the end."""
    rng = random.Random(number)
    pool = [Connection(labels={"conn": f"c{i}"}) for i in range(3)]
    for job in range(60):
        conn = pool[job % len(pool)]
        await conn.acquire()
        await anyio.sleep(rng.uniform(0, 0.002))
        if rng.random() < 0.1:
            await conn.fail()
            await conn.repair()
        else:
            await conn.release()
    await pool[0].acquire()
    await pool[1].acquire()
    return pool


def work(number: int, ready: Event, stop: Event) -> None:
    """A worker process: in it, prometheus_client was imported in multiprocess mode."""
    pool = anyio.run(serve_jobs, number)
    ready.set()
    stop.wait(60)  # the pool stays alive, and so do its series, until the parent says stop
    del pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--serve", type=int, metavar="PORT", help="serve on this port")
    args = parser.parse_args()

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    made = None
    if not directory:
        made = directory = tempfile.mkdtemp(prefix="multiproc-")
        # Inherited by the workers, which import prometheus_client after it is set.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory

    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    ready = [spawn.Event() for _ in range(args.workers)]
    workers = [spawn.Process(target=work, args=(n, ready[n], stop)) for n in range(args.workers)]
    for worker in workers:
        worker.start()
    for event in ready:
        event.wait(60)

    # What a /metrics handler does in multiprocess mode: a fresh registry, read from files.
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    try:
        if args.serve:
            start_http_server(args.serve, registry=registry)
            print(f"serving on http://127.0.0.1:{args.serve}/metrics (Ctrl-C stops)")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        else:
            print(generate_latest(registry).decode(), end="")
    finally:
        stop.set()
        for worker in workers:
            worker.join()
            # gunicorn's child_exit hook does this: the worker's live series go.
            mark_process_dead(worker.pid, directory)

    after = CollectorRegistry()
    MultiProcessCollector(after, path=directory)
    samples = [s for metric in after.collect() for s in metric.samples]
    live = sum(1 for s in samples if "pid" in s.labels)
    ran = sum(s.value for s in samples if s.name == "example_connection_state_transitions_total")
    print(f"after the workers exited: {live} live series, {ran:.0f} transitions counted")
    if made:
        shutil.rmtree(made)


if __name__ == "__main__":
    main()
