"""Multiprocess mode under churn: machines with unique labels, few alive at a time.

``python -m tests.benchmarks.multiprocess_churn [COUNT]`` runs a child process with
``PROMETHEUS_MULTIPROC_DIR`` set that creates COUNT machines (default 100 000), each with a
label value of its own, starts each and closes it, keeping at most 50 alive. It prints the
child's RSS, the size of the value files, and the time of one merged scrape.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CHILD = """
import os, sys, time, anyio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from statemachine_metrics import MeteredMachine

class Job(MeteredMachine, namespace="churn", labelnames=("job",), registry=None):
    states = ["pending", "running", "done"]
    transitions = [["start", "pending", "running"], ["finish", "running", "done"]]

async def main(count):
    alive = []
    for i in range(count):
        job = Job(labels={"job": f"job-{i:08d}"})
        await job.start()
        alive.append(job)
        if len(alive) > 50:
            old = alive.pop(0)
            await old.finish()
            await old.aclose()
    return alive

count = int(sys.argv[1])
started = time.perf_counter()
alive = anyio.run(main, count)
elapsed = time.perf_counter() - started
with open("/proc/self/statm") as f:
    rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
files = sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))
registry = CollectorRegistry()
MultiProcessCollector(registry, path=directory)
started = time.perf_counter()
text = generate_latest(registry)
scrape = time.perf_counter() - started
samples = sum(1 for line in text.splitlines() if line.startswith(b"churn_job_state{"))
print(f"machines {count}: {elapsed / count * 1e6:.1f} us each (create, 2 triggers, close)")
print(f"RSS {rss / 2**20:.1f} MiB; value files {files / 2**10:.0f} KiB")
print(f"merged scrape {scrape * 1e3:.1f} ms; Enum samples {samples}")
"""


def main() -> None:
    count = sys.argv[1] if len(sys.argv) > 1 else "100000"
    with tempfile.TemporaryDirectory() as directory:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
        subprocess.run([sys.executable, "-c", CHILD, count], env=env, check=True)


if __name__ == "__main__":
    main()
