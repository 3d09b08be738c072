"""`testing.rule_based`: model-based tests of machine classes, on asyncio and trio."""

from __future__ import annotations

import io
import unittest
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from statemachine_metrics import MeteredMachine
from statemachine_metrics.testing import rule_based

BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])

# Small and quick; reproducible; no explain phase (it traces every line, slowly).
FAST = settings(
    max_examples=40,
    stateful_step_count=15,
    database=None,
    deadline=None,
    derandomize=True,
    phases=[Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
)


class Worker(MeteredMachine, labelnames=("worker",), registry=None):
    """A worker that takes a job when it starts and must give it back."""

    states = ["idle", "running", "error"]
    transitions = [
        {"trigger": "start", "source": "idle", "dest": "running", "after": "take"},
        {"trigger": "finish", "source": "running", "dest": "idle", "after": "release"},
        ["fail", ["idle", "running"], "error"],
        # The planted bug: reset forgets to release the job a failed run still holds.
        ["reset", "error", "idle"],
    ]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job: str | None = None
        self.jobs: list[str] = []

    def take(self, job: str = "job") -> None:
        self.job = job
        self.jobs.append(job)

    def release(self) -> None:
        self.job = None


class FixedWorker(Worker):
    """The same machine, with the bug fixed."""

    async def on_enter_idle(self) -> None:
        self.job = None


def worker() -> Worker:
    return Worker(labels={"worker": "w"})


def fixed() -> FixedWorker:
    return FixedWorker(labels={"worker": "w"})


def no_job_when_idle(machine: Worker) -> None:
    assert machine.state != "idle" or machine.job is None, (
        f"an idle worker still holds {machine.job!r}"
    )


def failure(rules: type[Any]) -> AssertionError:
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(rules, settings=FAST)
    return caught.value


@BACKENDS
def test_finds_the_planted_bug_and_reports_its_three_trigger_path(backend: str) -> None:
    rules = rule_based(Worker, factory=worker, invariants=[no_job_when_idle], backend=backend)
    error = failure(rules)
    assert str(error).splitlines()[:6] == [
        "Worker: the invariant no_job_when_idle failed, after these steps:",
        "  1. start(): idle -> running",
        "  2. fail(): running -> error",
        "  3. reset(): error -> idle",
        "machine: <Worker state='idle' labels={'worker': 'w'}>",
        "an idle worker still holds 'job'",
    ]
    # Hypothesis' own report of the shortest example: the same three triggers.
    steps = [note for note in error.__notes__ if note.startswith("state.")]
    assert steps == ["state.start()", "state.fail()", "state.reset()", "state.teardown()"]


@BACKENDS
def test_a_correct_machine_passes_with_trigger_arguments(backend: str) -> None:
    made: list[FixedWorker] = []

    async def factory() -> FixedWorker:  # an async factory works too
        made.append(fixed())
        return made[-1]

    rules = rule_based(
        FixedWorker,
        factory=factory,
        invariants=[no_job_when_idle],
        arguments={"start": st.tuples(st.sampled_from(["a", "b"]))},
        backend=backend,
    )
    run_state_machine_as_test(rules, settings=FAST)
    assert len(made) >= FAST.max_examples
    assert {job for machine in made for job in machine.jobs} == {"a", "b"}
    # Each example's machine was closed at the end of the example.
    assert all(machine.closed for machine in made)
    # Every trigger ran somewhere: valid ones ran, invalid ones were refused.
    assert {machine.state for machine in made} == {"idle", "running", "error"}


def test_keyword_arguments_and_async_invariants() -> None:
    seen: list[str] = []

    async def remembers(machine: FixedWorker) -> bool:
        seen.extend(machine.jobs[len(seen) :])
        return True

    rules = rule_based(
        FixedWorker,
        factory=fixed,
        invariants=[remembers],
        arguments={"start": st.fixed_dictionaries({"job": st.just("kw")})},
    )
    run_state_machine_as_test(rules, settings=FAST)
    assert set(seen) == {"kw"}


@BACKENDS
def test_an_invariant_returning_false_fails(backend: str) -> None:
    def never_in_error(machine: FixedWorker) -> bool:
        return machine.state != "error"

    error = failure(
        rule_based(FixedWorker, factory=fixed, invariants=[never_in_error], backend=backend)
    )
    assert str(error).splitlines()[:2] == [
        "FixedWorker: the invariant never_in_error returned False, after these steps:",
        "  1. fail(): idle -> error",
    ]


class Rogue(MeteredMachine, registry=None):
    """Writes its own Enum series from a callback: the series then disagrees."""

    states = ["off", "on"]
    transitions = [["flip", "off", "on"], ["flop", "on", "off"]]

    def on_enter_on(self) -> None:
        Rogue.metric.state("off")


def test_a_series_that_disagrees_with_the_state_fails() -> None:
    error = failure(rule_based(Rogue))
    assert str(error).splitlines() == [
        "Rogue: the Enum series (no labels) shows 'off', the machine is in 'on', "
        "after these steps:",
        "  1. flip(): off -> on",
        "machine: <Rogue state='on'>",
    ]


class Leaky(MeteredMachine, registry=None):
    """Its flop raises from a callback: the error propagates, with the steps noted."""

    states = ["off", "on"]
    transitions = [["flip", "off", "on"], {"trigger": "flop", "source": "on", "dest": "off"}]

    def on_exit_on(self) -> None:
        raise KeyError("lost")


def test_an_exception_from_a_callback_fails_with_the_steps() -> None:
    with pytest.raises(KeyError) as caught:
        run_state_machine_as_test(rule_based(Leaky), settings=FAST)
    assert caught.value.__notes__[0].splitlines()[:3] == [
        "Leaky: flop() raised KeyError, after these steps:",
        "  1. flip(): off -> on",
        "  2. flop(): raised KeyError: 'lost'",
    ]


class Tolerant(MeteredMachine, registry=None):
    states = ["off", "on"]
    transitions = [["flip", "off", "on"], ["flop", "on", "off"]]
    ignore_invalid_triggers = True


def test_invalid_triggers_are_refused_or_ignored_as_declared() -> None:
    # FixedWorker refuses invalid triggers with MachineError; Tolerant ignores them.
    run_state_machine_as_test(rule_based(Tolerant), settings=FAST)
    error = failure(rule_based(FixedWorker, factory=fixed, invariants=[lambda m: False]))
    assert "  1. finish(): refused in idle (MachineError)" not in str(error)  # shrunk away

    def refused_once(machine: FixedWorker) -> None:
        assert machine.jobs != ["job", "job"], "started twice"

    error = failure(rule_based(FixedWorker, factory=fixed, invariants=[refused_once]))
    assert str(error).splitlines()[1:4] == [
        "  1. start(): idle -> running",
        "  2. finish(): running -> idle",
        "  3. start(): idle -> running",
    ]


def test_the_test_case_runs_under_unittest() -> None:
    case = rule_based(FixedWorker, factory=fixed, invariants=[no_job_when_idle]).TestCase
    case.settings = FAST
    result = unittest.TextTestRunner(stream=io.StringIO()).run(case("runTest"))
    assert result.wasSuccessful(), result.errors[0][1]
    buggy = rule_based(Worker, factory=worker, invariants=[no_job_when_idle]).TestCase
    buggy.settings = FAST
    result = unittest.TextTestRunner(stream=io.StringIO()).run(buggy("runTest"))
    assert len(result.failures) == 1
    assert "3. reset(): error -> idle" in result.failures[0][1]


class Template(MeteredMachine):
    pass


class Still(MeteredMachine, registry=None):
    states = ["only"]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: rule_based(int), TypeError, "takes a MeteredMachine class, not <class 'int'>"),
        (lambda: rule_based(Template), TypeError, "Template is abstract and has no metrics"),
        (lambda: rule_based(Still), ValueError, "Still declares no transitions to fire"),
        (
            lambda: rule_based(Worker, arguments={"strat": st.tuples()}),
            ValueError,
            "arguments for 'strat', which is not a trigger of Worker; its triggers are "
            "start, finish, fail, reset",
        ),
        (
            lambda: rule_based(Worker, arguments={"start": ("a",)}),
            TypeError,
            "arguments\\['start'\\] must be a Hypothesis strategy of a tuple",
        ),
        (lambda: rule_based(Worker, invariants=[1]), TypeError, "must be callable, not 1"),
        (lambda: rule_based(Worker, factory=1), TypeError, "factory must be callable"),
    ],
)
def test_bad_arguments_name_what_is_valid(call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_the_factory_must_make_a_machine_of_the_class() -> None:
    with pytest.raises(TypeError, match=r"the factory returned <FixedWorker .*>, not a Rogue"):
        run_state_machine_as_test(rule_based(Rogue, factory=fixed), settings=FAST)
