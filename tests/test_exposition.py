"""`generate_latest`: prometheus_client's bytes, text and OpenMetrics, for any registry."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import prometheus_client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as reference_openmetrics

from statemachine_metrics import MachineCollector, MeteredMachine, _engine, generate_latest

# Label values and states that need escaping, and some that sort before and after others.
ODD = ["", "a", "Z", 'q"uote', "back\\slash", "new\nline", "ünï✓", "{0}", "x}y{"]
STATES = ["idle", "run", 'q"uote', "back\\slash", "new\nline", "ünï", "{1}", "zz"]
LABELNAMES = ["aa", "worker", "zone"]  # before and after a state label like "mm_w0_state"
NAMESPACES = ["aa", "mm", "zz"]
BUCKETS = [None, (0.001, 1.0), (-1.0, 0.5, 2.0)]

_names = itertools.count()


@contextlib.contextmanager
def frozen_clock() -> Iterator[None]:
    """Hold `time.perf_counter` still, so that the oldest-stay gauges read the same twice."""
    real = time.perf_counter
    now = real()
    time.perf_counter = lambda: now
    try:
        yield
    finally:
        time.perf_counter = real


def assert_same(registry: Any) -> None:
    with frozen_clock():
        text_ours, text_theirs = (
            generate_latest(registry),
            prometheus_client.generate_latest(registry),
        )
        om_ours = generate_latest(registry, openmetrics=True)
        om_theirs = reference_openmetrics(registry)
    assert text_ours.decode() == text_theirs.decode()
    assert om_ours.decode() == om_theirs.decode()


@st.composite
def machine_class(draw: st.DrawFn) -> type[MeteredMachine]:
    states = draw(st.lists(st.sampled_from(STATES), min_size=2, max_size=4, unique=True))
    labelnames = tuple(draw(st.lists(st.sampled_from(LABELNAMES), max_size=2, unique=True)))
    edges = draw(
        st.lists(
            st.tuples(st.sampled_from(states), st.sampled_from(states)),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    transitions: list[Any] = [[f"t{i}", s, d] for i, (s, d) in enumerate(edges)]
    transitions.append({"trigger": "boom", "source": "*", "dest": None, "before": "explode"})
    body: dict[str, Any] = {
        "__doc__": draw(st.sampled_from(["Doc", 'He said "hi" \\ then\nleft', "Ünï"])),
        "states": states,
        "transitions": transitions,
        "explode": lambda self: (_ for _ in ()).throw(ValueError("boom")),
    }
    buckets = draw(st.sampled_from(BUCKETS))
    if buckets is not None:
        body["duration_buckets"] = buckets
    return type(
        f"W{next(_names)}",
        (MeteredMachine,),
        body,
        registry=None,
        namespace=draw(st.sampled_from(NAMESPACES)),
        labelnames=labelnames,
    )


def plain_metric(kind: str, labelled: bool, registry: CollectorRegistry, value: str) -> None:
    """One prometheus_client metric of `kind`, with a series or two and maybe an exemplar."""
    name = f"plain_{kind}_{next(_names)}"
    labels = ["k"] if labelled else []

    def child(metric: Any) -> Any:
        return metric.labels(value) if labelled else metric

    if kind == "counter":
        c = prometheus_client.Counter(name, "c \\ doc", labels, registry=registry)
        child(c).inc(2, exemplar={"trace_id": value[:20]})
    elif kind == "gauge":
        g = prometheus_client.Gauge(name, 'g "doc"', labels, registry=registry)
        child(g).set(1e7)
    elif kind == "histogram":
        h = prometheus_client.Histogram(name, "h", labels, registry=registry)
        child(h).observe(0.3, exemplar={"span": value[:20]})
    elif kind == "summary":
        s = prometheus_client.Summary(name, "s", labels, registry=registry)
        child(s).observe(2.5)
    elif kind == "info":
        i = prometheus_client.Info(name, "i", labels, registry=registry)
        child(i).info({"version": value})
    else:
        e = prometheus_client.Enum(name, "e", labels, states=["a", value + "!"], registry=registry)
        child(e).state(value + "!")


item = st.one_of(
    machine_class(),
    st.tuples(
        st.sampled_from(["counter", "gauge", "histogram", "summary", "info", "enum"]),
        st.booleans(),
    ),
)


@contextlib.contextmanager
def exemplars(source: Callable[[], dict[str, str] | None] | None) -> Iterator[None]:
    """Machines tag their transitions with `source()`, as they do with OpenTelemetry."""
    saved = _engine.exemplar_source
    _engine.exemplar_source = source
    try:
        yield
    finally:
        _engine.exemplar_source = saved


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    items=st.lists(item, min_size=1, max_size=4),
    values=st.lists(st.sampled_from(ODD), min_size=1, max_size=4),
    steps=st.lists(st.tuples(st.integers(0, 10), st.integers(0, 6)), max_size=25),
    exemplar=st.sampled_from([None, "abc", 'q"\\\n']),
    created=st.booleans(),
    target=st.booleans(),
    survivors=st.integers(0, 10),
)
def test_same_bytes_as_prometheus_client(
    items: list[Any],
    values: list[str],
    steps: list[tuple[int, int]],
    exemplar: str | None,
    created: bool,
    target: bool,
    survivors: int,
) -> None:
    registry = CollectorRegistry(target_info={"env": 'pro"d'} if target else None)
    machines: list[MeteredMachine] = []
    for entry in items:
        if isinstance(entry, tuple):
            kind, labelled = entry
            plain_metric(kind, labelled, registry, values[0])
            continue
        registry.register(MachineCollector(entry))
        names = entry.metric._labelnames
        for combo in itertools.islice(itertools.product(values, repeat=len(names)), 4):
            machines.append(entry(labels=dict(zip(names, combo))) if names else entry())

    async def run() -> None:
        for index, trigger in steps:
            if not machines:
                return
            machine = machines[index % len(machines)]
            triggers = [t[0] if isinstance(t, list) else t["trigger"] for t in machine.transitions]
            with contextlib.suppress(Exception):
                await machine.trigger(triggers[trigger % len(triggers)])

    label = None if exemplar is None else {"trace_id": exemplar}
    with exemplars(None if label is None else (lambda: label)):
        anyio.run(run)
    del machines[survivors:]  # the others end, and their label sets go with them

    if not created:
        prometheus_client.disable_created_metrics()
    try:
        assert_same(registry)
    finally:
        prometheus_client.enable_created_metrics()


class Door(MeteredMachine, registry=None, namespace="exposition", labelnames=("door",)):
    """State of a door"""

    states = ["closed", "open"]
    transitions = [["push", "closed", "open"], ["pull", "open", "closed"]]


def test_machine_collector_as_the_registry() -> None:
    doors = [Door(labels={"door": str(i)}) for i in range(3)]
    collector = MachineCollector(Door)
    assert_same(collector)
    assert b'exposition_door_state{door="2",exposition_door_state="closed"} 1.0' in (
        generate_latest(collector)
    )
    del doors


def test_restricted_registry_goes_through_prometheus_client() -> None:
    registry = CollectorRegistry()
    registry.register(MachineCollector(Door))
    door = Door(labels={"door": "front"})
    restricted = registry.restricted_registry(["exposition_door_state_machines"])
    assert_same(restricted)
    assert generate_latest(restricted).startswith(b"# HELP exposition_door_state_machines ")
    del door


def test_default_registry_by_default() -> None:
    class Hatch(MeteredMachine, namespace="exposition_default"):
        states = ["shut", "ajar"]

    hatch = Hatch()
    assert b'exposition_default_hatch_state{exposition_default_hatch_state="shut"} 1.0' in (
        generate_latest()
    )
    assert generate_latest(openmetrics=True).endswith(b"# EOF\n")
    del hatch


def test_scrapes_during_churn_never_raise_nor_show_half_a_machine() -> None:
    """Scrapes in threads while machines are created, transition and end."""
    registry = CollectorRegistry()
    registry.register(MachineCollector(Door))
    stop = threading.Event()
    failures: list[BaseException] = []
    scrapes = [0]

    def scrape() -> None:
        while not stop.is_set():
            try:
                for openmetrics in (False, True):
                    body = generate_latest(registry, openmetrics=openmetrics).decode()
                    check(body)
                scrapes[0] += 1
            except BaseException as error:
                failures.append(error)
                return

    def check(body: str) -> None:
        # Every machine's series shows exactly one state at 1, and the live counts add
        # up to the series shown (each door has a label set of its own).
        ones: dict[str, int] = {}
        for line in body.splitlines():
            if line.startswith("exposition_door_state{"):
                door = line.split('door="', 1)[1].split('"', 1)[0]
                ones[door] = ones.get(door, 0) + (line.endswith(" 1.0"))
        assert all(count == 1 for count in ones.values()), ones
        live = sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.splitlines()
            if line.startswith("exposition_door_state_machines{")
        )
        assert live == len(ones)

    async def churn() -> None:
        for round in range(60):
            doors = [Door(labels={"door": f"{round}-{i}"}) for i in range(50)]
            for door in doors[::2]:
                await door.push()
            del doors, door
            await anyio.lowlevel.checkpoint()

    threads = [threading.Thread(target=scrape) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        anyio.run(churn)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[0]
    assert scrapes[0] > 0
