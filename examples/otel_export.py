"""Send machine spans and metrics to an OpenTelemetry Collector over OTLP/HTTP.

A pool of download workers, instrumented with `statemachine_metrics.otel`: every trigger
is a span inside its batch's span, and ``statemachine.machines``,
``statemachine.transitions`` and ``statemachine.state.duration`` go out every second.

    pip install 'statemachine-metrics[otel]' opentelemetry-sdk \\
        opentelemetry-exporter-otlp-proto-http
    python examples/otel_export.py --endpoint http://127.0.0.1:4318 --batches 20

The endpoint is a Collector's OTLP/HTTP receiver (port 4318 by default; the exporter
posts to ``/v1/traces`` and ``/v1/metrics`` under it). The library itself depends on the
OpenTelemetry API only: the SDK, the exporter and where it sends are this program's choice.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

import anyio
from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry

from statemachine_metrics import MeteredMachine, Trigger, otel

# A registry of its own, so that importing this module never clashes with other metrics;
# the Prometheus metrics work alongside the OpenTelemetry ones.
REGISTRY = CollectorRegistry()


class Download(MeteredMachine, namespace="shop", labelnames=("worker",), registry=REGISTRY):
    """State of a download worker"""

    states = ["idle", "downloading", "failed"]
    fetch = Trigger("idle", "downloading")
    done = Trigger("downloading", "idle")
    fail = Trigger("downloading", "failed")
    retry = Trigger("failed", "idle")


def setup(endpoint: str, export_interval: float = 1.0) -> tuple[TracerProvider, MeterProvider]:
    """The SDK's providers, exporting over OTLP/HTTP to `endpoint`, made global."""
    resource = Resource.create({"service.name": "download-pool"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
    )
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{endpoint}/v1/metrics"),
        export_interval_millis=export_interval * 1000,
    )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return tracer_provider, meter_provider


async def worker(name: str, batches: int, rng: random.Random) -> None:
    """Download `batches` batches of three files; one download in ten fails."""
    tracer = trace.get_tracer(__name__)
    async with Download(labels={"worker": name}) as machine:
        for batch in range(batches):
            with tracer.start_as_current_span(f"batch {batch}", attributes={"worker": name}):
                for _ in range(3):
                    await machine.fetch()
                    await anyio.sleep(rng.uniform(0.001, 0.02))
                    if rng.random() < 0.1:
                        await machine.fail()
                        await machine.retry()
                    else:
                        await machine.done()


async def run(workers: int = 3, batches: int = 5, seed: int = 1) -> None:
    """Run the pool until every worker is through its batches."""
    rng = random.Random(seed)
    async with anyio.create_task_group() as tg:
        for i in range(workers):
            tg.start_soon(worker, f"w{i}", batches, rng)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--endpoint", default="http://127.0.0.1:4318", help="the Collector's OTLP/HTTP address"
    )
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--batches", type=int, default=5, help="batches per worker")
    args = parser.parse_args(argv)
    tracer_provider, meter_provider = setup(args.endpoint)
    # Every machine class, through the global providers that setup() installed.
    instrumentation = otel.instrument()
    try:
        anyio.run(run, args.workers, args.batches)
    finally:
        # Sends what is still buffered: the last spans and a last collection of metrics.
        tracer_provider.shutdown()
        meter_provider.shutdown()
        instrumentation.uninstrument()
    print(f"sent to {args.endpoint}")


if __name__ == "__main__":
    main()
