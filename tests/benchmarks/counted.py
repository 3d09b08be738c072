"""One case of `bench_instructions`, run `n` operations deep: ``python -m
tests.benchmarks.counted CASE N``.

The cases are those of the timed tables, with their loops shortened to `n` operations
(after a warm-up of the same code), and the garbage collector off so that its passes do
not land on one run and not the other.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable

import anyio

from . import bench_pool, bench_tasks, bench_transition

WARM = 100


def transition_case(name: str) -> Callable[[], Awaitable[None]]:
    t = bench_transition
    loops: dict[str, Callable[[], Awaitable[None]]] = {
        "floor": t.floor(),
        "floor + 3 calls": t.floor(3),
        "ours, no callbacks": t.ours(t.Worker),
        "ours, labelled": t.ours(t.LabelledWorker, labels={"worker": "w1"}),
        "ours, condition + before + after (sync)": t.ours(t.CheckedWorker),
    }
    return loops[name]


def set_jobs(jobs: int) -> None:
    """The pool's size for `jobs` jobs: 100 workers (the loops read these globals)."""
    bench_pool.WORKERS = 100
    bench_pool.JOBS = bench_tasks.JOBS = max(jobs // 100, 1)


def loop_of(case: str, n: int) -> Callable[[], object]:
    """`case`, `n` operations deep, ready to run."""
    name, _, backend = case.rpartition(", ")
    if name in bench_tasks.CASES:
        main = bench_pool.pool(bench_tasks.CASES[name])

        def jobs() -> object:
            set_jobs(n)
            return anyio.run(main, backend=backend)

        return jobs

    def transitions() -> object:
        bench_transition.N = n
        return anyio.run(transition_case(name), backend=backend)

    return transitions


def main(case: str, counts: list[int]) -> None:
    """Run `case` once to warm up, then once for each of `counts`, each inside its own
    ``breakpoint()`` call: callgrind, told to count only inside it and to write its
    counts after each, gives one total per run."""
    if os.environ.get("COUNTED_INSTRUMENT"):
        # Under ``valgrind --instr-atstart=no``: instrument from here on, not the imports.
        subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True)
    loop_of(case, WARM)()
    gc.disable()
    for n in counts:
        sys.breakpointhook = loop_of(case, n)
        breakpoint()


if __name__ == "__main__":
    main(sys.argv[1], [int(n) for n in sys.argv[2:]])
