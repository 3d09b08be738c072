"""A scrape through prometheus_client reuses each series' samples while its state holds.

`collect()` keeps, per Enum series, the samples it last exposed, and makes new ones only
for the states whose value changed. These tests check the exposition against a fresh
`prometheus_client.Enum` holding what the series should show, after every step of random
runs (transitions, new machines, closed machines, remove() and clear()), and that
unchanged series really are reused.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from typing import Any

import anyio
import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from statemachine_metrics import MachineCollector, MachineError, MeteredMachine

STATES = ["idle", "running", "error"]
TRANSITIONS = [
    ["start", "idle", "running"],
    ["finish", "running", "idle"],
    ["fail", "*", "error"],
    ["reset", "error", "idle"],
]
TRIGGERS = [t[0] for t in TRANSITIONS]
LABELS = ["a", "b", 'q"uote', "new\nline"]

_names = itertools.count()


def worker_class() -> Any:
    class Worker(
        MeteredMachine,
        registry=None,
        namespace=f"reuse{next(_names)}",
        labelnames=("worker",),
    ):
        states = STATES
        transitions = TRANSITIONS

    return Worker


def enum_lines(body: bytes, name: str) -> list[bytes]:
    """The Enum family's sample lines (the other families have no reference here)."""
    return [line for line in body.splitlines() if line.startswith(f"{name}{{".encode())]


def assert_shows(
    cls: type[MeteredMachine], registry: CollectorRegistry, shown: dict[str, str]
) -> None:
    """The machines' Enum exposes exactly `shown` (label value -> state), as the
    reference Enum does, in both formats, and twice in a row (the second from reuse)."""
    name = cls.metric_names()[0]
    reference = CollectorRegistry()
    enum = prometheus_client.Enum(name, "d", ["worker"], states=STATES, registry=reference)
    for label, state in shown.items():
        enum.labels(label).state(state)
    for generate in (prometheus_client.generate_latest, generate_openmetrics):
        expected = enum_lines(generate(reference), name)
        assert enum_lines(generate(registry), name) == expected
        assert enum_lines(generate(registry), name) == expected


steps = st.lists(
    st.one_of(
        st.tuples(st.just("new"), st.sampled_from(LABELS), st.just("")),
        st.tuples(st.just("trigger"), st.sampled_from(LABELS), st.sampled_from(TRIGGERS)),
        st.tuples(st.just("close"), st.sampled_from(LABELS), st.just("")),
        st.tuples(st.just("remove"), st.sampled_from(LABELS), st.just("")),
        st.tuples(st.just("clear"), st.just(""), st.just("")),
    ),
    max_size=30,
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(max_examples=25, deadline=None)
@given(steps)
def test_every_scrape_shows_the_current_states(
    backend: str, ops: list[tuple[str, str, str]]
) -> None:
    cls = worker_class()
    registry = CollectorRegistry()
    registry.register(MachineCollector(cls))
    live: dict[str, list[Any]] = {label: [] for label in LABELS}
    shown: dict[str, str] = {}  # what each series should show

    async def run() -> None:
        assert_shows(cls, registry, shown)
        for op, label, trigger in ops:
            machines = live.get(label, [])
            if op == "new":
                machines.append(cls(labels={"worker": label}))
                shown[label] = "idle"  # a new machine writes its initial state
            elif op == "trigger" and machines:
                machine = machines[-1]
                try:
                    await getattr(machine, trigger)()
                except MachineError:
                    pass
                else:
                    shown[label] = machine.state  # the last write wins
            elif op == "close" and machines:
                await machines.pop(0).aclose()
                if not machines:
                    shown.pop(label, None)  # the last machine takes its series along
            elif op == "remove" and label in shown:
                cls.metric.remove(label)
                del shown[label]
            elif op == "clear":
                cls.metric.clear()
                shown.clear()
            assert_shows(cls, registry, shown)
        for machines in live.values():
            for machine in machines:
                await machine.aclose()

    anyio.run(run, backend=backend)


@pytest.mark.anyio
async def test_unchanged_series_reuse_their_samples(anyio_backend: str) -> None:
    cls = worker_class()
    first, second, third = (cls(labels={"worker": label}) for label in ("1", "2", "3"))

    def enum_samples() -> dict[tuple[str, str], Any]:
        (family,) = cls.metric.collect()
        return {(s.labels["worker"], s.labels[family.name]): s for s in family.samples}

    before = enum_samples()
    assert len(before) == 9
    await second.start()
    await third.fail()
    after = enum_samples()
    # The series whose state held: the very same samples.
    for state in STATES:
        assert after["1", state] is before["1", state]
    # A series that changed: new samples for the two states whose value changed, the
    # same one for the state whose value did not, and the same label dicts throughout.
    assert [after["2", s].value for s in STATES] == [0, 1, 0]
    assert after["2", "idle"] is not before["2", "idle"]
    assert after["2", "running"] is not before["2", "running"]
    assert after["2", "error"] is before["2", "error"]
    assert [after["3", s].value for s in STATES] == [0, 0, 1]
    for label in ("2", "3"):
        for state in STATES:
            assert after[label, state].labels is before[label, state].labels
    # Back to a state shown before: correct values, reused while it holds.
    await second.finish()
    again = enum_samples()
    assert [again["2", s].value for s in STATES] == [1, 0, 0]
    assert enum_samples()["2", "idle"] is again["2", "idle"]
    for machine in (first, second, third):
        await machine.aclose()


@pytest.mark.anyio
async def test_a_series_that_comes_back_is_built_afresh(anyio_backend: str) -> None:
    cls = worker_class()
    name = cls.metric_names()[0]

    def enum_samples() -> list[Any]:
        (family,) = cls.metric.collect()
        return family.samples

    machine = cls(labels={"worker": "w"})
    await machine.start()
    before = enum_samples()
    cls.metric.remove("w")
    assert enum_samples() == []
    # A transition of the machine still bound to it brings the series back.
    await machine.finish()
    back = enum_samples()
    assert [(s.labels, s.value) for s in back] == [
        ({"worker": "w", name: state}, 1 if state == "idle" else 0) for state in STATES
    ]
    assert all(b is not a and b.labels is not a.labels for a, b in zip(before, back))
    await machine.aclose()
    assert enum_samples() == []


def test_unlabelled_metric_reuses_and_updates() -> None:
    class Job(MeteredMachine, registry=None, namespace=f"reuse{next(_names)}"):
        states = STATES
        transitions = TRANSITIONS

    name = Job.metric_names()[0]
    registry = CollectorRegistry()
    registry.register(MachineCollector(Job))
    reference = CollectorRegistry()
    enum = prometheus_client.Enum(name, "d", states=STATES, registry=reference)

    async def run() -> None:
        job = Job()
        for trigger in ["start", "fail", "reset", "start", "finish"]:
            await getattr(job, trigger)()
            enum.state(job.state)
            for _ in range(2):
                ours = enum_lines(prometheus_client.generate_latest(registry), name)
                assert ours == enum_lines(prometheus_client.generate_latest(reference), name)
        await job.aclose()
        # The one series of an unlabelled class keeps the last state written.
        assert enum_lines(prometheus_client.generate_latest(registry), name) == enum_lines(
            prometheus_client.generate_latest(reference), name
        )

    anyio.run(run)


def test_enum_children_samples_match_the_reference() -> None:
    # prometheus_client's own collection path (`_samples()`), which a subclass of
    # MetricWrapperBase may call, gives the reference's samples too.
    from statemachine_metrics import Enum

    ours = Enum("r", "d", ["w"], registry=None, states=STATES)
    theirs = prometheus_client.Enum("r", "d", ["w"], registry=None, states=STATES)
    for metric in (ours, theirs):
        metric.labels("x").state("running")
        metric.labels("y")
    assert list(ours._samples()) == list(theirs._samples())
    assert list(ours.labels("x")._samples()) == list(theirs.labels("x")._samples())
    ours.labels("x").state("error")
    theirs.labels("x").state("error")
    assert list(ours._samples()) == list(theirs._samples())


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_child_scrapes_its_own_states() -> None:
    # The parent scrapes (so its series hold samples to reuse), then forks; the child
    # moves its copies of the machines, and its scrapes show the child's states.
    code = """
        import os, sys
        import anyio
        import prometheus_client
        from prometheus_client import CollectorRegistry
        from statemachine_metrics import MachineCollector, MeteredMachine

        class Worker(MeteredMachine, registry=None, labelnames=("worker",)):
            states = ["idle", "running"]
            transitions = [["start", "idle", "running"]]

        registry = CollectorRegistry()
        registry.register(MachineCollector(Worker))
        machines = [Worker(labels={"worker": str(i)}) for i in range(3)]

        def ones():
            return sorted(
                line for line in prometheus_client.generate_latest(registry).decode().splitlines()
                if line.startswith("worker_state{") and line.endswith(" 1.0")
            )

        before = ones()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            anyio.run(machines[1].start)
            os.write(write, "|".join(ones()).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = os.read(read, 65536).decode().split("|")
        assert ones() == before, ones()
        moved = 'worker_state{worker="1",worker_state="running"} 1.0'
        assert child == [before[0], moved, before[2]], child
        print("ok")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.anyio
async def test_machine_collector_reuses_the_enum_samples(anyio_backend: str) -> None:
    # prometheus_client's generate_latest collects through MachineCollector: the same reuse.
    cls = worker_class()
    collector = MachineCollector(cls)
    name = cls.metric_names()[0]

    def enum_samples() -> list[Any]:
        (family,) = [f for f in collector.collect() if f.name == name]
        return family.samples

    machines = [cls(labels={"worker": label}) for label in ("1", "2")]
    before = enum_samples()
    assert enum_samples() == before
    assert all(a is b for a, b in zip(enum_samples(), before))
    await machines[1].start()
    after = enum_samples()
    assert [s.value for s in after] == [1, 0, 0, 0, 1, 0]
    assert [a is b for a, b in zip(after, before)] == [True, True, True, False, False, True]
    for machine in machines:
        await machine.aclose()
    assert enum_samples() == []
