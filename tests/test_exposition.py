"""`generate_latest`: prometheus_client's bytes, text and OpenMetrics, for any registry."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import prometheus_client
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as reference_openmetrics

from statemachine_metrics import (
    MachineCollector,
    MeteredMachine,
    _engine,
    generate_latest,
    make_asgi_app,
    serve_metrics,
)

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


# -- serving -------------------------------------------------------------------------------

ACCEPT = [
    None,
    "text/plain",
    "text/plain;version=0.0.4",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=dots",
    "application/openmetrics-text",
    "application/openmetrics-text;version=1.0.0;escaping=values",
    "application/openmetrics-text;version=0.0.1",
    # What Prometheus 3 sends.
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;"
    "escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
]


async def asgi_get(
    app: Any, accept: str | None, encoding: str | None, query: bytes
) -> tuple[int, dict[bytes, bytes], bytes]:
    headers = [(b"host", b"localhost")]
    if accept is not None:
        headers.append((b"Accept", accept.encode()))
    if encoding is not None:
        headers.append((b"accept-encoding", encoding.encode()))
    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
    scope["query_string"] = query
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent
    headers_sent = dict(start["headers"])
    payload = body["body"]
    if headers_sent.get(b"Content-Encoding") == b"gzip":
        payload = gzip.decompress(payload)  # gzip stamps the time: compare what it holds
    return start["status"], headers_sent, payload


@pytest.mark.anyio
@pytest.mark.parametrize("accept", ACCEPT)
@pytest.mark.parametrize(
    ("encoding", "query"),
    [(None, b""), ("gzip, deflate", b""), (None, b"name[]=exposition_door_state_machines")],
)
async def test_asgi_app_negotiates_as_prometheus_client(
    anyio_backend: str, accept: str | None, encoding: str | None, query: bytes
) -> None:
    registry = CollectorRegistry()
    registry.register(MachineCollector(Door))
    prometheus_client.Counter("requests", "Requests", ["path"], registry=registry).labels("/")
    door = Door(labels={"door": "x.y"})
    await door.push()
    with frozen_clock():
        ours = await asgi_get(make_asgi_app(registry), accept, encoding, query)
        theirs = await asgi_get(prometheus_client.make_asgi_app(registry), accept, encoding, query)
    assert ours == theirs
    assert ours[0] == 200
    assert (b"Content-Encoding" in ours[1]) == (encoding is not None)


@pytest.mark.anyio
async def test_asgi_app_without_compression(anyio_backend: str) -> None:
    registry = CollectorRegistry()
    registry.register(MachineCollector(Door))
    _, headers, body = await asgi_get(
        make_asgi_app(registry, disable_compression=True), None, "gzip", b""
    )
    assert b"Content-Encoding" not in headers
    assert body.startswith(b"# HELP exposition_door_state State of a door\n")


def http_get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


@pytest.mark.anyio
async def test_serve_metrics_serves_our_exposition(anyio_backend: str) -> None:
    registry = CollectorRegistry()
    registry.register(MachineCollector(Door))
    door = Door(labels={"door": 'say "hi"'})
    await door.push()
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_metrics, 0, "127.0.0.1", registry)
        url = f"http://127.0.0.1:{port}/metrics"
        accept = "application/openmetrics-text; version=1.0.0"
        with frozen_clock():
            status, headers, body = await anyio.to_thread.run_sync(
                http_get, url, {"Accept": accept}
            )
            expected = reference_openmetrics(registry)
        assert status == 200
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body == expected
        assert b'door="say \\"hi\\"",exposition_door_state="open"} 1.0' in body

        status, headers, body = await anyio.to_thread.run_sync(http_get, url, {})
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert body.startswith(b"# HELP exposition_door_state State of a door\n")

        post = urllib.request.Request(url, data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            await anyio.to_thread.run_sync(urllib.request.urlopen, post)
        refused.value.close()
        assert refused.value.code == 405
        tg.cancel_scope.cancel()
