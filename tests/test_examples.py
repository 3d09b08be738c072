"""The programs in examples/: each runs quickly here, and its metrics say what it did."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys
import types
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client import Enum as ReferenceEnum

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

Load = Callable[[str], Any]


def _unregister_new(before: set[object]) -> None:
    for collector in set(REGISTRY._collector_to_names) - before:
        REGISTRY.unregister(collector)


@pytest.fixture
def load() -> Iterator[Load]:
    """Import an example afresh (its classes register in the default registry, as in a real
    program); unregister them afterwards so that the next test can import it again."""
    before = set(REGISTRY._collector_to_names)
    loaded: list[str] = []

    def load(name: str) -> Any:
        module_name = f"example_under_test_{name}"
        spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        loaded.append(module_name)
        spec.loader.exec_module(module)
        return module

    yield load
    _unregister_new(before)
    for module_name in loaded:
        sys.modules.pop(module_name, None)


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def transitions(prefix: str, source: str, dest: str, trigger: str) -> float | None:
    return value(f"{prefix}_transitions_total", **{"from": source, "to": dest, "trigger": trigger})


# -- reference_worker ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_reference_worker(load: Load, anyio_backend: str) -> None:
    example = load("reference_worker")
    outcomes = await example.run(6, failure_rate=0.5, job_seconds=(0, 0), backoff=0, seed=3)
    assert outcomes["finished"] > 0
    assert outcomes["failed"] > 0
    assert sum(outcomes.values()) == 6

    name = "myapp_worker_state"
    assert transitions(name, "idle", "running", "start") == 6
    assert transitions(name, "running", "idle", "finish") == outcomes["finished"]
    assert transitions(name, "running", "error", "fail") == outcomes["failed"]
    assert transitions(name, "error", "idle", "recover") == outcomes["failed"]
    assert value(f"{name}_duration_seconds_count", myapp_worker_state="running") == 6
    assert value(f"{name}_errors_total", trigger="fail", error="JobFailed") is None
    # The worker has ended: no machine left, and the Enum keeps its last state.
    assert value(f"{name}_machines", myapp_worker_state="idle") == 0
    assert value(name, myapp_worker_state="idle") == 1


def test_reference_worker_exposes_the_reference_enum(load: Load) -> None:
    example = load("reference_worker")
    registry = CollectorRegistry()
    reference = ReferenceEnum(
        "worker_state",
        "Current state of the background worker",
        states=["idle", "running", "error"],
        namespace="myapp",
        registry=registry,
    )
    reference.state("running")
    worker = example.Worker()
    anyio.run(worker.start)

    def enum_lines(text: bytes) -> list[str]:
        return [
            line
            for line in text.decode().splitlines()
            if re.match(r"(# (HELP|TYPE) )?myapp_worker_state[ {]", line)
        ]

    assert enum_lines(generate_latest(REGISTRY)) == enum_lines(generate_latest(registry))


def test_reference_worker_main(
    load: Load, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load("reference_worker")
    served: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(example, "start_http_server", lambda *a, **kw: served.append((a, kw)))
    quick = partial(example.run, job_seconds=(0, 0), backoff=0, failure_rate=0)
    monkeypatch.setattr(example, "run", quick)
    example.main(["--jobs", "3", "--port", "9999", "--backend", "trio"])
    assert served == [((9999,), {"addr": "127.0.0.1"})]
    out = capsys.readouterr().out
    assert "http://127.0.0.1:9999/metrics" in out
    assert "3 jobs finished, 0 failed" in out


def test_tutorial_builds_the_reference_worker(load: Load) -> None:
    # docs/tutorial.md draws its worker from examples/reference_worker.py: same machine.
    blocks = re.findall(
        r"^```python\n(.*?)^```", (ROOT / "docs/tutorial.md").read_text(), re.M | re.S
    )
    first = next(block for block in blocks if "class Worker(" in block)
    before = set(REGISTRY._collector_to_names)
    namespace: dict[str, Any] = {"__name__": "tutorial"}
    try:
        exec(first, namespace)
    finally:
        _unregister_new(before)
    tutorial = namespace["Worker"]
    example = load("reference_worker").Worker
    for describe in ("state_names", "transition_table", "metric_names"):
        assert getattr(tutorial, describe)() == getattr(example, describe)()
    assert tutorial.metric._documentation == example.metric._documentation


# -- worker_pool --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_worker_pool(load: Load, anyio_backend: str) -> None:
    example = load("worker_pool")
    seen: list[dict[str, float | None]] = []

    class Probe(example.Job):  # type: ignore[name-defined]
        async def run(self) -> None:
            # While the pool runs: every worker is counted, and has its own series.
            prefix = "myapp_pool_worker_state"
            seen.append(
                {
                    state: value(f"{prefix}_machines", myapp_pool_worker_state=state)
                    for state in ("waiting", "busy", "backoff", "stopped")
                }
                | {w: value(prefix, worker=w, myapp_pool_worker_state="busy") for w in ("w0", "w2")}
            )

    jobs = [*example.made_up_jobs(20, failure_rate=0.3, seconds=(0, 0.001), seed=1), Probe(99, 0)]
    outcomes = await example.run_pool(jobs, workers=3, backoff=0)
    assert outcomes["failed"] > 0
    assert outcomes["done"] + outcomes["failed"] == 21

    name = "myapp_pool_worker_state"
    assert transitions(name, "waiting", "busy", "take") == 21
    assert transitions(name, "busy", "waiting", "done") == outcomes["done"]
    assert transitions(name, "busy", "backoff", "fail") == outcomes["failed"]
    assert transitions(name, "backoff", "waiting", "retry") == outcomes["failed"]
    assert transitions(name, "waiting", "stopped", "stop") == 3
    assert value(f"{name}_duration_seconds_count", myapp_pool_worker_state="busy") == 21

    [during] = seen
    assert (during["busy"] or 0) >= 1
    assert sum(during[s] or 0 for s in ("waiting", "busy", "backoff")) == 3
    assert during["w0"] is not None
    assert during["w2"] is not None
    # Afterwards: workers closed, no machine counted, no per-worker series left.
    for state in ("waiting", "busy", "backoff", "stopped"):
        assert value(f"{name}_machines", myapp_pool_worker_state=state) == 0
    assert value(name, worker="w0", myapp_pool_worker_state="stopped") is None


def test_worker_pool_main(
    load: Load, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load("worker_pool")
    monkeypatch.setattr(example, "start_http_server", lambda port, addr: None)
    quick = partial(example.made_up_jobs, failure_rate=0, seconds=(0, 0))
    monkeypatch.setattr(example, "made_up_jobs", quick)
    example.main(["--jobs", "5", "--workers", "2"])
    assert "5 jobs done, 0 failed" in capsys.readouterr().out
    assert transitions("myapp_pool_worker_state", "waiting", "stopped", "stop") == 2


# -- trio_worker --------------------------------------------------------------------------


def test_trio_worker(load: Load) -> None:
    trio = pytest.importorskip("trio")
    example = load("trio_worker")

    class Flaky(example.Timing):  # type: ignore[name-defined]
        """Every other connection attempt takes too long; sessions end at once."""

        calls = 0

        def connect(self) -> float:
            self.calls += 1
            return 10 * self.connect_limit if self.calls % 2 else 0.0

        def session(self) -> float:
            return 0.0

    peers = ("db", "cache")
    outcomes = trio.run(partial(example.run, peers, sessions=3, timing=Flaky(scale=0.001)))
    assert outcomes["sessions"] == 6
    assert outcomes["timeouts"] >= 1

    name = "myapp_connection_state"
    attempts = outcomes["sessions"] + outcomes["timeouts"]
    assert transitions(name, "disconnected", "connecting", "dial") == attempts
    assert transitions(name, "connecting", "connected", "established") == 6
    assert transitions(name, "connected", "disconnected", "lost") == 6
    assert transitions(name, "connecting", "disconnected", "lost") == outcomes["timeouts"]
    assert transitions(name, "disconnected", "closed", "close") == 2
    assert transitions(name, "connected", "closed", "close") == 0
    for state in ("disconnected", "connecting", "connected", "closed"):
        assert value(f"{name}_machines", myapp_connection_state=state) == 0
    assert value(name, peer="db", myapp_connection_state="closed") is None


# -- asgi_app -----------------------------------------------------------------------------


async def call(app: Any, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """One GET request to an ASGI app, without a server: status, headers, body."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": [(b"accept", b"text/plain")],
        "query_string": b"",
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, *body = sent
    assert start["type"] == "http.response.start"
    return start["status"], dict(start["headers"]), b"".join(m["body"] for m in body)


@pytest.mark.anyio
async def test_asgi_app(load: Load, anyio_backend: str) -> None:
    example = load("asgi_app")
    statuses = [(await call(example.app, path))[0] for path in ("/", "/", "/fail", "/nope")]
    assert statuses == [200, 200, 500, 404]

    status, headers, body = await call(example.app, "/metrics")
    assert status == 200
    assert headers[b"Content-Type"].startswith(b"text/plain")
    text = body.decode()
    name = "myapp_request_state"
    counted = {
        (source, dest, trigger): float(number)
        for source, dest, trigger, number in re.findall(
            rf'^{name}_transitions_total{{from="(\w+)",to="(\w+)",trigger="(\w+)"}} (\S+)$',
            text,
            re.M,
        )
    }
    assert counted == {
        ("received", "handling", "handle"): 4,
        ("handling", "done", "finish"): 3,
        ("handling", "failed", "fail"): 1,
    }
    # Every request's machine ended with it.
    for state in ("received", "handling", "done", "failed"):
        assert f'{name}_machines{{{name}="{state}"}} 0.0' in text


@pytest.mark.anyio
async def test_asgi_app_lifespan(load: Load, anyio_backend: str) -> None:
    example = load("asgi_app")
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await example.app({"type": "lifespan"}, receive, send)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


def test_asgi_app_main(
    load: Load, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load("asgi_app")
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # not installed
    with pytest.raises(SystemExit) as exited:
        example.main([])
    assert exited.value.code == 1
    assert "pip install uvicorn" in capsys.readouterr().err

    ran: list[tuple[Any, str, int]] = []
    uvicorn = types.ModuleType("uvicorn")
    uvicorn.run = lambda app, host, port: ran.append((app, host, port))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uvicorn", uvicorn)
    example.main(["--port", "9000"])
    assert ran == [(example.app, "127.0.0.1", 9000)]


# -- outputs shown in the docs ------------------------------------------------------------

_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```$", re.M | re.S)


@pytest.mark.parametrize(
    ("page", "outputs"), [("tutorial.md", 4), ("diagrams.md", 3), ("metrics.md", 1)]
)
def test_docs_show_what_their_code_prints(page: str, outputs: int) -> None:
    # A ```text block right after a ```python block (with at most one paragraph of prose
    # between them) shows what that code prints: each of its lines must be printed, but
    # for "..." (an abridged part) and the _sum of a histogram (a measured time).
    text = (ROOT / "docs" / page).read_text()
    namespace: dict[str, Any] = {"__name__": f"docs.{page}"}
    printed: list[str] = []
    previous: re.Match[str] | None = None
    checked = 0
    for fence in _FENCE.finditer(text):
        kind, body = fence[1], fence[2]
        if kind == "python":
            before = set(REGISTRY._collector_to_names)
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(body, page, "exec"), namespace)
            finally:
                _unregister_new(before)
            printed = out.getvalue().splitlines()
        elif kind == "text" and previous is not None and previous[1] == "python":
            gap = text[previous.end() : fence.start()].strip()
            if "\n\n" not in gap and not re.search(r"^#", gap, re.M):
                for line in body.splitlines():
                    if line != "..." and "_sum{" not in line:
                        assert line in printed, f"{page}: {line!r} is not printed"
                checked += 1
        previous = fence
    assert checked == outputs
