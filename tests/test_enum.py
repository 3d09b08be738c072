"""`statemachine_metrics.Enum` against `prometheus_client.Enum`, the reference it replaces."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest, validation
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from statemachine_metrics import REGISTRY, Enum

STATES = ["idle", "running", "error"]


Pair = tuple[Enum, prometheus_client.Enum, CollectorRegistry, CollectorRegistry]


def pair(**kwargs: Any) -> Pair:
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = Enum(registry=ours_registry, **kwargs)
    theirs = prometheus_client.Enum(registry=theirs_registry, **kwargs)
    return ours, theirs, ours_registry, theirs_registry


def outcome(op: Callable[[], object]) -> tuple[str, str]:
    try:
        op()
    except (ValueError, TypeError) as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


def assert_same_exposition(ours: CollectorRegistry, theirs: CollectorRegistry) -> None:
    assert generate_latest(ours) == generate_latest(theirs)
    assert generate_openmetrics(ours) == generate_openmetrics(theirs)


# Label values that exercise escaping in both exposition formats.
label_values = st.sampled_from(["a", "b", 'q"uote', "back\\slash", "new\nline", "", "ü"])
state_names = st.sampled_from([*STATES, "unknown"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("state"), st.tuples(label_values, label_values), state_names),
        st.tuples(st.just("labels"), st.tuples(label_values, label_values), st.none()),
        st.tuples(st.just("remove"), st.tuples(label_values, label_values), st.none()),
        st.tuples(st.just("remove_by_labels"), st.tuples(label_values), st.none()),
        st.tuples(st.just("clear"), st.tuples(), st.none()),
    ),
    max_size=25,
)


def apply(metric: Any, op: str, values: tuple[str, ...], arg: Any) -> None:
    if op == "state":
        metric.labels(*values).state(arg)
    elif op == "labels":
        metric.labels(*values)
    elif op == "remove":
        metric.remove(*values)
    elif op == "remove_by_labels":
        metric.remove_by_labels({"worker": values[0]})
    else:
        metric.clear()


@settings(max_examples=200, deadline=None)
@given(operations)
def test_labelled_exposition_is_byte_identical(ops: list[tuple[str, tuple[str, ...], Any]]) -> None:
    ours, theirs, ours_registry, theirs_registry = pair(
        name="state",
        documentation='Worker "state"\\ with\nnewline',
        labelnames=["worker", "pool"],
        namespace="myapp",
        states=STATES,
    )
    for op, values, arg in ops:
        results = [outcome(partial(apply, metric, op, values, arg)) for metric in (ours, theirs)]
        # Both refuse an unknown state; ours says more about it.
        assert results[0][0] == results[1][0]
        if op != "state":
            assert results[0] == results[1]
        assert_same_exposition(ours_registry, theirs_registry)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(state_names, max_size=10), st.sampled_from(["", "ns"]), st.sampled_from(["", "sub"])
)
def test_unlabelled_exposition_is_byte_identical(
    ops: list[str], namespace: str, subsystem: str
) -> None:
    ours, theirs, ours_registry, theirs_registry = pair(
        name="task_state",
        documentation="Description of enum",
        namespace=namespace,
        subsystem=subsystem,
        states=["starting", "running", "stopped"],
    )
    assert_same_exposition(ours_registry, theirs_registry)
    for state in ops:
        assert outcome(partial(ours.state, state))[0] == outcome(partial(theirs.state, state))[0]
        assert_same_exposition(ours_registry, theirs_registry)


def value(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    return registry.get_sample_value(name, labels)


def test_full_name_and_first_state_is_default() -> None:
    registry = CollectorRegistry()
    Enum(
        "state",
        "Worker state",
        states=["idle", "running", "error"],
        namespace="myapp",
        subsystem="worker",
        registry=registry,
    )
    assert value(registry, "myapp_worker_state", {"myapp_worker_state": "idle"}) == 1
    assert value(registry, "myapp_worker_state", {"myapp_worker_state": "running"}) == 0


def test_unknown_state_raises_and_keeps_value() -> None:
    registry = CollectorRegistry()
    e = Enum("s", "d", states=["a", "b"], registry=registry)
    e.state("b")
    with pytest.raises(ValueError, match=r"'c' is not a state of Enum s; states are a, b"):
        e.state("c")
    with pytest.raises(ValueError, match="not a state"):
        e.state(["unhashable"])  # type: ignore[arg-type]
    assert value(registry, "s", {"s": "b"}) == 1
    assert value(registry, "s", {"s": "a"}) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"unit": "seconds"}, "cannot have a unit"),
        ({"states": []}, "No states provided for Enum metric: s"),
        ({"states": ["a", "b", "a"]}, "Duplicate states for Enum metric s: a"),
        ({"labelnames": ["s"]}, "Overlapping labels for Enum metric: s"),
        ({"labelnames": ["ns_s"], "namespace": "ns"}, "Overlapping labels for Enum metric: ns_s"),
        ({"name": ""}, "should not be empty"),
        ({"labelnames": ["__reserved"]}, "Reserved label metric name: __reserved"),
    ],
)
def test_constructor_errors_match_reference(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"name": "s", "documentation": "d", "states": ["a", "b"]}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Enum(registry=None, **arguments)
    # The reference refuses the same input, except what it silently gets wrong: duplicate
    # states, and a full name (with its namespace) among the label names.
    if "Duplicate" not in message and "ns_s" not in message:
        with pytest.raises(ValueError):  # noqa: PT011 - its messages are its own
            prometheus_client.Enum(registry=None, **arguments)


@pytest.fixture
def legacy_names() -> Iterator[None]:
    validation.enable_legacy_validation()
    yield
    validation.disable_legacy_validation()


@pytest.mark.usefixtures("legacy_names")
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad-name"}, "invalid metric name bad-name"),
        ({"labelnames": ["bad-label"]}, "Invalid label metric name: bad-label"),
    ],
)
def test_legacy_name_validation_is_honoured(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"name": "s", "documentation": "d", "states": ["a", "b"]}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Enum(registry=None, **arguments)
    with pytest.raises(ValueError, match=message):
        prometheus_client.Enum(registry=None, **arguments)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.labels("x"),
        lambda m: m.labels("x", "y", "z"),
        lambda m: m.labels("x", pool="y"),
        lambda m: m.labels(worker="x", nope="y"),
        lambda m: m.labels("x", "y").labels("x", "y"),
        lambda m: m.state("a"),
        lambda m: m.remove("x"),
        lambda m: m.remove_by_labels({"nope": "x"}),
        lambda m: m.remove_by_labels(["worker"]),
    ],
)
def test_label_errors_match_reference(call: Callable[[Any], object]) -> None:
    ours, theirs, _, _ = pair(
        name="s", documentation="d", labelnames=["worker", "pool"], states=["a", "b"]
    )
    ours_outcome, theirs_outcome = outcome(lambda: call(ours)), outcome(lambda: call(theirs))
    assert ours_outcome[0] != "ok"
    assert ours_outcome == theirs_outcome


def test_no_labelnames_errors_match_reference() -> None:
    ours, theirs, _, _ = pair(name="s", documentation="d", states=["a", "b"])
    for call in (lambda m: m.labels("x"), lambda m: m.remove("x")):
        assert outcome(lambda c=call: c(ours)) == outcome(lambda c=call: c(theirs))
        assert outcome(lambda c=call: c(ours))[0] == "ValueError"
    ours.clear()  # a no-op, as in the reference


def test_registry_none_and_default_registry() -> None:
    e = Enum("statemachine_metrics_test_unregistered", "d", states=["a"], registry=None)
    assert REGISTRY is prometheus_client.REGISTRY
    assert REGISTRY.get_sample_value(e._name, {e._name: "a"}) is None
    registered = Enum("statemachine_metrics_test_registered", "d", states=["a"])
    try:
        name = "statemachine_metrics_test_registered"
        assert REGISTRY.get_sample_value(name, {name: "a"}) == 1
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            Enum(name, "d", states=["a"])
    finally:
        REGISTRY.unregister(registered)


def test_children_are_enums_sharing_the_parent_definition() -> None:
    e = Enum("s", "d", ["worker"], states=["a", "b"], registry=None)
    child = e.labels("w1")
    assert isinstance(child, Enum)
    assert e.labels(worker="w1") is child
    assert repr(child) == repr(e) == "statemachine_metrics._enum.Enum(s)"
    child.state("b")
    assert [s.value for s in e.collect()[0].samples] == [0, 1]


def test_state_is_thread_safe_under_concurrent_scrapes() -> None:
    registry = CollectorRegistry()
    states = [f"s{i}" for i in range(20)]
    e = Enum("hammered", "d", ["worker"], states=states, registry=registry)
    children = [e.labels(str(i)) for i in range(8)]
    stop = threading.Event()
    problems: list[str] = []

    def writer(seed: int) -> None:
        i = seed
        while not stop.is_set():
            children[i % len(children)].state(states[i % len(states)])
            i += 7

    def scraper() -> None:
        for _ in range(200):
            totals: dict[str, float] = {}
            for metric in registry.collect():
                for sample in metric.samples:
                    worker = sample.labels["worker"]
                    totals[worker] = totals.get(worker, 0) + sample.value
            if set(totals.values()) != {1}:
                problems.append(repr(totals))
        stop.set()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    threads.append(threading.Thread(target=scraper))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not problems


def test_signature_is_the_documented_one() -> None:
    import inspect

    parameters = list(inspect.signature(Enum).parameters.values())
    assert [p.name for p in parameters[:8]] == [
        "name",
        "documentation",
        "labelnames",
        "namespace",
        "subsystem",
        "unit",
        "registry",
        "states",
    ]
    assert parameters[6].default is REGISTRY
    e = Enum("positional", "d", (), "", "", "", None, ["a", "b"])
    assert e._states == ("a", "b")
