"""The examples of the "Observe machines" page: examples/listeners.py, and
examples/otel_export.py against a stand-in OTLP/HTTP receiver on the loopback.

The receiver accepts the exporter's POSTs to ``/v1/traces`` and ``/v1/metrics`` and keeps
the decoded requests; the example runs as a program of its own, as a reader would run it
(it sets the global OpenTelemetry providers).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import anyio
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE = EXAMPLES / "otel_export.py"


def load(name: str) -> ModuleType:
    """Import an example afresh (it keeps its metrics in a registry of its own)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- examples/listeners.py ---------------------------------------------------------------


@pytest.mark.anyio
async def test_the_listeners_example(anyio_backend: str) -> None:
    example = load("listeners")
    out = io.StringIO()
    with anyio.fail_after(10):
        await example.run(out)
    *lines, last = out.getvalue().splitlines()
    assert last == "A-1 shipped"
    records = [json.loads(line) for line in lines]
    assert [(r["order"], r["trigger"], r["from"], r["to"], r["internal"]) for r in records] == [
        ("A-1", "pay", "placed", "paid", False),
        ("A-1", "note", "paid", "paid", True),
        ("A-2", "cancel", "placed", "cancelled", False),
        ("A-1", "ship", "paid", "shipped", False),
    ]
    assert records[1]["stayed_seconds"] is None
    assert records[3]["stayed_seconds"] >= 0.01  # it stayed in paid across the sleep
    # The class listener was removed at the end: further transitions are not logged.
    await example.Order(labels={"order": "B"}).pay()
    assert len(out.getvalue().splitlines()) == 5
    assert (
        example.REGISTRY.get_sample_value(
            "shop_order_state_transitions_total",
            {"from": "paid", "to": "shipped", "trigger": "ship"},
        )
        == 1
    )


# -- examples/otel_export.py -------------------------------------------------------------


class Receiver(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.content_types: set[str] = set()


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.content_types.add(self.headers["Content-Type"])
        if self.path == "/v1/traces":
            self.server.traces.append(ExportTraceServiceRequest.FromString(body))
        elif self.path == "/v1/metrics":
            self.server.metrics.append(ExportMetricsServiceRequest.FromString(body))
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_the_example_sends_spans_and_metrics_over_otlp(receiver: Receiver) -> None:
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--endpoint", endpoint, "--workers", "2", "--batches", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"sent to {endpoint}"
    assert "Traceback" not in done.stderr, done.stderr
    assert receiver.content_types == {"application/x-protobuf"}

    spans = [
        span
        for request in receiver.traces
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    by_id = {span.span_id: span for span in spans}
    triggers = [s for s in spans if s.name.startswith("Download ")]
    fetches = [s for s in triggers if s.name == "Download fetch"]
    assert len(fetches) == 2 * 3 * 3
    for span in triggers:
        parent = by_id[span.parent_span_id]
        assert parent.name.startswith("batch "), parent.name
        assert span.trace_id == parent.trace_id
        attributes = {a.key: a.value for a in span.attributes}
        assert attributes["statemachine.class"].string_value == "Download"
        assert attributes["statemachine.result"].bool_value is True

    services = {
        a.value.string_value
        for request in receiver.metrics
        for resource in request.resource_metrics
        for a in resource.resource.attributes
        if a.key == "service.name"
    }
    assert services == {"download-pool"}
    last = receiver.metrics[-1]
    reported = {
        metric.name: metric
        for resource in last.resource_metrics
        for scope in resource.scope_metrics
        if scope.scope.name == "statemachine_metrics"
        for metric in scope.metrics
    }
    assert set(reported) >= {"statemachine.transitions", "statemachine.state.duration"}
    fetched = sum(
        point.as_int
        for point in reported["statemachine.transitions"].sum.data_points
        if any(
            a.key == "statemachine.trigger" and a.value.string_value == "fetch"
            for a in point.attributes
        )
    )
    assert fetched == len(fetches)
    assert reported["statemachine.state.duration"].unit == "s"
    # The last collection, once every machine was closed: each state listed, at 0.
    machines = reported["statemachine.machines"].sum
    assert not machines.is_monotonic
    live = {
        next(a.value.string_value for a in p.attributes if a.key == "statemachine.state"): p.as_int
        for p in machines.data_points
    }
    assert live == {"idle": 0, "downloading": 0, "failed": 0}
