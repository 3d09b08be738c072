"""A transition in multiprocess mode, where every update also goes to shared value files.

prometheus_client picks its multiprocess mode when it is imported, so the case runs in a
child process started with ``PROMETHEUS_MULTIPROC_DIR`` set; this process measures the
same loop with the values in memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import anyio

from ._harness import Table, interleaved

N = 20_000


def measure() -> float:
    from statemachine_metrics import MeteredMachine

    class Worker(MeteredMachine, registry=None, labelnames=("worker",)):
        states = ["idle", "running"]
        transitions = [["start", "idle", "running"], ["finish", "running", "idle"]]

    async def loop() -> None:
        machine = Worker(labels={"worker": "w1"})
        for _ in range(N // 2):
            await machine.start()  # type: ignore[attr-defined]
            await machine.finish()  # type: ignore[attr-defined]

    times = interleaved({"ours": (lambda: anyio.run(loop, backend="asyncio"), N)})
    return times["ours"]


def run() -> Table:
    table = Table("A labelled transition, in memory and in multiprocess mode")
    plain = "ours, labelled, asyncio"
    table.add(plain, measure())
    with tempfile.TemporaryDirectory() as directory:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
        child = subprocess.run(
            [sys.executable, "-m", "tests.benchmarks.bench_multiprocess"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    table.add("ours, labelled, asyncio, multiprocess mode", json.loads(child.stdout), plain)
    return table


if __name__ == "__main__":
    print(json.dumps(measure()))
