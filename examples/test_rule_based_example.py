"""Model-based tests of a worker with `statemachine_metrics.testing.rule_based`.

Hypothesis fires random triggers at fresh workers (valid ones, and invalid ones that must
be refused) and checks after every step that the worker agrees with its metrics and that
the invariant below holds. Run it with

    pytest examples/test_rule_based_example.py

docs/testing.md shows the same worker with a planted bug, and the path the test finds.
"""

from __future__ import annotations

import unittest

from hypothesis import settings
from hypothesis import strategies as st

from statemachine_metrics import MeteredMachine
from statemachine_metrics.testing import rule_based


class Worker(MeteredMachine, namespace="example", labelnames=("worker",), registry=None):
    """State of a worker that holds a job while it runs"""

    states = ["idle", "running", "error"]
    transitions = [
        {"trigger": "start", "source": "idle", "dest": "running", "after": "take"},
        ["finish", "running", "idle"],
        ["fail", ["idle", "running"], "error"],
        ["reset", "error", "idle"],
    ]

    def __init__(self, *, labels: dict[str, str] | None = None) -> None:
        super().__init__(labels=labels)
        self.job: str | None = None

    def take(self, job: str = "job") -> None:
        self.job = job

    def on_enter_idle(self) -> None:
        self.job = None  # however it got back to idle


def no_job_when_idle(worker: Worker) -> None:
    assert worker.state != "idle" or worker.job is None, f"an idle worker holds {worker.job!r}"


def make_worker() -> Worker:
    return Worker(labels={"worker": "w1"})


def worker_rules(backend: str) -> type[unittest.TestCase]:
    """The model-based test of Worker on one event loop; start gets a job name."""
    rules = rule_based(
        Worker,
        factory=make_worker,
        invariants=[no_job_when_idle],
        arguments={"start": st.tuples(st.sampled_from(["resize", "upload"]))},
        backend=backend,
    )
    case = rules.TestCase
    case.settings = settings(max_examples=30, deadline=None)
    return case


TestWorkerOnAsyncio = worker_rules("asyncio")
TestWorkerOnTrio = worker_rules("trio")
