"""`statemachine_metrics.otel`: spans and OpenTelemetry metrics, on asyncio and trio.

Spans and metrics are read back with the SDK's in-memory span exporter and metric reader;
each test makes its own machine classes (in registries of their own) and providers.
"""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from statemachine_metrics import MachineError, MeteredMachine, TaskMachine, otel
from tests._machines import metered


@dataclass
class Telemetry:
    """An SDK tracer provider and meter provider whose output is kept in memory."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    spans_exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def instrument(self, *classes: type[MeteredMachine]) -> otel.Instrumentation:
        return otel.instrument(
            *classes, tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        spans = list(self.spans_exporter.get_finished_spans())
        return [s for s in spans if name is None or s.name == name]

    def span(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]

    def points(self, metric: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        """Each data point of `metric`, keyed by its sorted attributes."""
        data = self.reader.get_metrics_data()
        found: dict[tuple[tuple[str, Any], ...], Any] = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        assert scope.scope.name == "statemachine_metrics"
                        for point in m.data.data_points:
                            found[tuple(sorted((point.attributes or {}).items()))] = point
        return found

    def metric_unit(self, metric: str) -> str | None:
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        return m.unit
        return None


def key(**attributes: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((f"statemachine.{k}", v) for k, v in attributes.items()))


def new_telemetry() -> Telemetry:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    return Telemetry(tracer_provider, meter_provider, exporter, reader)


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = new_telemetry()
    yield t
    t.meter_provider.shutdown()
    t.tracer_provider.shutdown()


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# -- spans ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_each_trigger_is_a_span_with_its_transition(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    Worker = metered()
    with telemetry.instrument(Worker):
        w = Worker()
        assert await w.start() is True
        assert await w.trigger("finish") is True
    start = telemetry.span("Worker start")
    assert attributes(start) == {
        "statemachine.class": "Worker",
        "statemachine.trigger": "start",
        "statemachine.source": "idle",
        "statemachine.dest": "running",
        "statemachine.result": True,
    }
    assert start.status.status_code is StatusCode.UNSET
    assert attributes(telemetry.span("Worker finish"))["statemachine.dest"] == "idle"


@pytest.mark.anyio
async def test_a_refused_trigger_has_a_source_and_no_dest(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    Worker = metered()
    with telemetry.instrument(Worker):
        assert await Worker().start_if() is False
    span = telemetry.span("Worker start_if")
    assert attributes(span)["statemachine.result"] is False
    assert attributes(span)["statemachine.source"] == "idle"
    assert "statemachine.dest" not in attributes(span)


@pytest.mark.anyio
async def test_an_internal_transition_stays_where_it_is(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    Worker = metered()
    with telemetry.instrument(Worker):
        w = Worker(initial="running")
        await w.heartbeat()
    span = telemetry.span("Worker heartbeat")
    assert attributes(span)["statemachine.source"] == "running"
    assert attributes(span)["statemachine.dest"] == "running"


@pytest.mark.anyio
async def test_an_invalid_trigger_is_an_error_span(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    Worker = metered()
    with telemetry.instrument(Worker), pytest.raises(MachineError):
        await Worker().finish()
    span = telemetry.span("Worker finish")
    assert span.status.status_code is StatusCode.ERROR
    assert attributes(span)["error.type"] == "MachineError"
    assert attributes(span)["statemachine.source"] == "idle"
    assert "statemachine.result" not in attributes(span)
    assert [e.name for e in span.events] == ["exception"]
    assert span.events[0].attributes is not None
    assert str(span.events[0].attributes["exception.type"]).endswith("MachineError")


@pytest.mark.anyio
async def test_a_callback_that_raises_after_the_state_changed(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    async def on_enter_running(self: Any) -> None:
        raise ValueError("disk full")

    Worker = metered(on_enter_running=on_enter_running)
    with telemetry.instrument(Worker):
        w = Worker()
        with pytest.raises(ValueError, match="disk full"):
            await w.start()
    span = telemetry.span("Worker start")
    assert span.status.status_code is StatusCode.ERROR
    assert attributes(span)["error.type"] == "ValueError"
    assert attributes(span)["statemachine.source"] == "idle"
    assert attributes(span)["statemachine.dest"] == "running"


@pytest.mark.anyio
async def test_a_cancelled_trigger_ends_its_span_without_error(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    async def on_enter_running(self: Any) -> None:
        await anyio.sleep_forever()

    Worker = metered(on_enter_running=on_enter_running)
    with telemetry.instrument(Worker):
        w = Worker()
        with anyio.move_on_after(0.01):
            await w.start()
    span = telemetry.span("Worker start")
    assert span.end_time is not None
    assert span.status.status_code is StatusCode.UNSET
    assert attributes(span)["statemachine.dest"] == "running"


@pytest.mark.anyio
async def test_the_span_is_a_child_of_the_callers_span(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    Worker = metered()
    tracer = telemetry.tracer_provider.get_tracer(__name__)
    with telemetry.instrument(Worker):
        w = Worker()
        with tracer.start_as_current_span("request") as request:
            await w.start()
    span = telemetry.span("Worker start")
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id
    assert span.context is not None
    assert span.context.trace_id == request.get_span_context().trace_id


@pytest.mark.anyio
async def test_a_trigger_that_waited_for_its_turn_is_a_child_of_its_own_caller(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    entered = anyio.Event()
    go_on = anyio.Event()

    async def on_enter_running(self: Any) -> None:
        entered.set()
        await go_on.wait()

    Worker = metered(on_enter_running=on_enter_running)
    tracer = telemetry.tracer_provider.get_tracer(__name__)
    w = Worker()
    parents = {}

    async def call(trigger: str) -> None:
        with tracer.start_as_current_span(f"caller of {trigger}") as parent:
            parents[trigger] = parent.get_span_context()
            await w.trigger(trigger)

    with telemetry.instrument(Worker):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "start")
            await entered.wait()  # `start` holds the turn
            tg.start_soon(call, "finish")  # waits behind it
            await anyio.sleep(0.01)
            assert telemetry.spans("Worker finish") == []
            go_on.set()
    assert w.state == "idle"
    for trigger, source, dest in (("start", "idle", "running"), ("finish", "running", "idle")):
        span = telemetry.span(f"Worker {trigger}")
        assert span.parent is not None
        assert span.parent.span_id == parents[trigger].span_id, trigger
        assert span.context is not None
        assert span.context.trace_id == parents[trigger].trace_id
        assert attributes(span)["statemachine.source"] == source
        assert attributes(span)["statemachine.dest"] == dest
    # The waiting trigger's span began before the first one's ended: it covers the wait.
    assert telemetry.span("Worker finish").start_time < telemetry.span("Worker start").end_time  # type: ignore[operator]


@pytest.mark.anyio
async def test_a_trigger_from_a_callback_is_a_child_span(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    async def on_enter_running(self: Any) -> None:
        await self.finish()

    Worker = metered(on_enter_running=on_enter_running)
    with telemetry.instrument(Worker):
        w = Worker()
        await w.start()
    outer = telemetry.span("Worker start")
    inner = telemetry.span("Worker finish")
    assert inner.parent is not None
    assert outer.context is not None
    assert inner.parent.span_id == outer.context.span_id
    assert (attributes(outer)["statemachine.source"], attributes(outer)["statemachine.dest"]) == (
        "idle",
        "running",
    )
    assert (attributes(inner)["statemachine.source"], attributes(inner)["statemachine.dest"]) == (
        "running",
        "idle",
    )


@pytest.mark.anyio
async def test_a_queued_trigger_span_ends_when_it_is_queued(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    async def on_enter_running(self: Any) -> None:
        assert await self.finish() is True  # queued: runs once `start` is through
        assert self.state == "running"

    Worker = metered(on_enter_running=on_enter_running, queued=True)
    with telemetry.instrument(Worker):
        w = Worker()
        await w.start()
        assert w.state == "idle"
        counted = telemetry.points("statemachine.transitions")
    finish = attributes(telemetry.span("Worker finish"))
    assert finish["statemachine.result"] is True
    assert finish["statemachine.source"] == "running"
    assert "statemachine.dest" not in finish
    start = attributes(telemetry.span("Worker start"))
    assert (start["statemachine.source"], start["statemachine.dest"]) == ("idle", "running")
    # The queued transition ran, and counts.
    assert counted[key(**{"class": "Worker"}, source="running", dest="idle", trigger="finish")]


@pytest.mark.anyio
async def test_track_and_timeouts_are_traced(anyio_backend: str, telemetry: Telemetry) -> None:
    Worker = metered(timeouts={"running": (0.01, "fail")})
    failed = anyio.Event()
    with telemetry.instrument(Worker):
        async with Worker() as w:
            w.add_listener(lambda event: failed.set() if event.dest == "error" else None)
            async with w.track(enter="start", success="finish"):
                pass
            await w.start()
            with anyio.fail_after(5):
                await failed.wait()
    assert [s.name for s in telemetry.spans()] == [
        "Worker start",
        "Worker finish",
        "Worker start",
        "Worker fail",
    ]
    assert attributes(telemetry.span("Worker fail"))["statemachine.source"] == "running"


@pytest.mark.anyio
async def test_task_machines_created_later_are_covered(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    with telemetry.instrument(TaskMachine):

        class Fetch(TaskMachine, registry=CollectorRegistry()):
            pass

        @Fetch.task
        async def fetch() -> int:
            return 1

        assert await fetch() == 1
    assert [s.name for s in telemetry.spans()] == ["Fetch start", "Fetch succeed"]


@pytest.mark.anyio
async def test_subclasses_are_covered_and_named_as_themselves(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    Worker = metered()
    with telemetry.instrument(Worker):
        Sub = type("Sub", (Worker,), {})  # created later, no states of its own
        await Sub().start()
        Own = metered("Own", base=Worker)  # states of its own: its own metric
        await Own().start()
        points = telemetry.points("statemachine.transitions")
    assert attributes(telemetry.span("Sub start"))["statemachine.class"] == "Sub"
    assert attributes(telemetry.span("Own start"))["statemachine.class"] == "Own"
    # Metrics name the class that owns the Prometheus metric: Sub counts with Worker.
    start = {"source": "idle", "dest": "running", "trigger": "start"}
    assert points[key(**{"class": "Worker"}, **start)].value == 1
    assert points[key(**{"class": "Own"}, **start)].value == 1


@pytest.mark.anyio
async def test_no_classes_means_every_class(anyio_backend: str, telemetry: Telemetry) -> None:
    Before = metered("Before")
    with telemetry.instrument():
        After = metered("After")
        await Before().start()
        await After().start()
    assert {s.name for s in telemetry.spans()} == {"Before start", "After start"}


@pytest.mark.anyio
async def test_other_classes_are_left_alone(anyio_backend: str, telemetry: Telemetry) -> None:
    Worker, Other = metered(), metered("Other")
    with telemetry.instrument(Worker):
        await Other().start()
    assert telemetry.spans() == []
    assert telemetry.points("statemachine.transitions") == {}


# -- metrics -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_three_instruments(anyio_backend: str, telemetry: Telemetry) -> None:
    Worker = metered()
    with telemetry.instrument(Worker):
        machines = [Worker() for _ in range(3)]
        await machines[0].start()
        await machines[1].start()
        await anyio.sleep(0.01)
        await machines[1].finish()
        await machines[0].heartbeat()

        live = telemetry.points("statemachine.machines")
        assert {k: p.value for k, p in live.items()} == {
            key(**{"class": "Worker"}, state="idle"): 2,
            key(**{"class": "Worker"}, state="running"): 1,
            key(**{"class": "Worker"}, state="error"): 0,
        }

        counted = {k: p.value for k, p in telemetry.points("statemachine.transitions").items()}
        assert counted == {
            key(**{"class": "Worker"}, source="idle", dest="running", trigger="start"): 2,
            key(**{"class": "Worker"}, source="running", dest="idle", trigger="finish"): 1,
            key(**{"class": "Worker"}, source="running", dest="running", trigger="heartbeat"): 1,
        }

        durations = telemetry.points("statemachine.state.duration")
        # An internal transition does not leave its state: nothing recorded for it.
        assert {k: p.count for k, p in durations.items()} == {
            key(**{"class": "Worker"}, state="idle"): 2,
            key(**{"class": "Worker"}, state="running"): 1,
        }
        running = durations[key(**{"class": "Worker"}, state="running")]
        assert 0.01 <= running.sum < 5
        # Buckets in seconds, as the Prometheus histogram's.
        assert 0.0001 in running.explicit_bounds
        assert 86400.0 in running.explicit_bounds
        assert telemetry.metric_unit("statemachine.state.duration") == "s"


@pytest.mark.anyio
async def test_machines_follow_closing(anyio_backend: str, telemetry: Telemetry) -> None:
    Worker = metered()
    with telemetry.instrument(Worker):
        async with Worker() as w:
            await w.start()
            live = telemetry.points("statemachine.machines")
            assert live[key(**{"class": "Worker"}, state="running")].value == 1
        live = telemetry.points("statemachine.machines")
        assert live[key(**{"class": "Worker"}, state="running")].value == 0


@settings(max_examples=25, deadline=None)
@given(
    triggers=st.lists(
        st.sampled_from(["start", "finish", "fail", "reset", "heartbeat", "start_if"]),
        max_size=12,
    )
)
def test_otel_metrics_agree_with_the_prometheus_ones(triggers: list[str]) -> None:
    telemetry = new_telemetry()
    Worker = metered()
    outcomes = []

    async def main() -> None:
        w = Worker()
        for trigger in triggers:
            try:
                outcomes.append(await w.trigger(trigger))
            except MachineError:
                outcomes.append(None)

    try:
        with telemetry.instrument(Worker):
            anyio.run(main)
            counted = telemetry.points("statemachine.transitions")
            durations = telemetry.points("statemachine.state.duration")
    finally:
        telemetry.meter_provider.shutdown()
    spans = telemetry.spans()
    assert [s.name for s in spans] == [f"Worker {t}" for t in triggers]
    assert [attributes(s).get("statemachine.result") for s in spans] == outcomes
    assert [s.status.status_code is StatusCode.ERROR for s in spans] == [
        o is None for o in outcomes
    ]
    for point_key, point in counted.items():
        a = dict(point_key)
        prometheus = Worker.registry_.get_sample_value(
            "worker_state_transitions_total",
            {
                "from": a["statemachine.source"],
                "to": a["statemachine.dest"],
                "trigger": a["statemachine.trigger"],
            },
        )
        assert point.value == prometheus
    assert sum(p.value for p in counted.values()) == sum(o is True for o in outcomes)
    for point_key, point in durations.items():
        state = dict(point_key)["statemachine.state"]
        prometheus = Worker.registry_.get_sample_value(
            "worker_state_duration_seconds_count", {"worker_state": state}
        )
        assert point.count == prometheus


# -- exemplars -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_prometheus_samples_carry_the_trigger_spans_trace_id(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    async def on_exit_idle(self: Any) -> None:
        await anyio.lowlevel.checkpoint()  # not the fast path

    Worker = metered(on_exit_idle=on_exit_idle)
    tracer = telemetry.tracer_provider.get_tracer(__name__)
    with telemetry.instrument(Worker):
        w = Worker()
        with tracer.start_as_current_span("job") as job:
            await w.start()
    trace_id = format(job.get_span_context().trace_id, "032x")
    text = openmetrics_latest(Worker.registry_).decode()
    counter = re.search(
        r'^worker_state_transitions_total\{from="idle",to="running",trigger="start"\} .*$',
        text,
        re.M,
    )
    assert counter is not None
    assert f'# {{trace_id="{trace_id}"}}' in counter.group(0)
    buckets = re.findall(
        r'^worker_state_duration_seconds_bucket\{.*worker_state="idle".*$', text, re.M
    )
    assert [b for b in buckets if f'# {{trace_id="{trace_id}"}}' in b] != []


# -- uninstrument, twice -------------------------------------------------------------------


@pytest.mark.anyio
async def test_uninstrument_removes_everything(anyio_backend: str, telemetry: Telemetry) -> None:
    Worker = metered()
    events: list[Any] = []
    Worker.add_listener(events.append)  # a listener of the application's: it stays
    instrumentation = telemetry.instrument(Worker)
    w = Worker()
    await w.start()
    assert instrumentation.active
    instrumentation.uninstrument()
    assert not instrumentation.active
    instrumentation.uninstrument()  # harmless
    assert "uninstrumented" in repr(instrumentation)
    before = {k: p.value for k, p in telemetry.points("statemachine.transitions").items()}
    await w.finish()
    await w.start()
    assert [s.name for s in telemetry.spans()] == ["Worker start"]
    assert {k: p.value for k, p in telemetry.points("statemachine.transitions").items()} == before
    assert telemetry.points("statemachine.machines") == {}
    assert telemetry.points("statemachine.state.duration") != {}
    assert len(events) == 3
    # Classes created afterwards are left alone too.
    Sub = type("Sub", (Worker,), {})
    await Sub().start()
    assert len(telemetry.spans()) == 1
    Worker.remove_listener(events.append)


@pytest.mark.anyio
async def test_instrument_again_after_uninstrument(
    anyio_backend: str, telemetry: Telemetry
) -> None:
    Worker = metered()
    telemetry.instrument(Worker).uninstrument()
    with telemetry.instrument(Worker):
        w = Worker()
        await w.start()
        live = telemetry.points("statemachine.machines")
    assert live[key(**{"class": "Worker"}, state="running")].value == 1
    assert len(telemetry.spans("Worker start")) == 1


def test_a_class_is_instrumented_once_at_a_time(telemetry: Telemetry) -> None:
    Worker, Other = metered(), metered("Other")
    Sub = type("Sub", (Worker,), {})
    with telemetry.instrument(Worker):
        with pytest.raises(ValueError, match=r"Worker is instrumented already"):
            telemetry.instrument(Worker)
        with pytest.raises(ValueError, match=r"Sub is instrumented already"):
            telemetry.instrument(Sub)
        with pytest.raises(ValueError, match="machine classes are instrumented already"):
            telemetry.instrument()
        with telemetry.instrument(Other):  # another class: fine
            pass
    with (
        telemetry.instrument(),
        pytest.raises(ValueError, match="every machine class is instrumented already"),
    ):
        telemetry.instrument(Other)


def test_an_instrumented_class_can_be_garbage_collected(telemetry: Telemetry) -> None:
    def make() -> weakref.ref[Any]:
        Worker = metered()
        Sub = type("Sub", (Worker,), {})
        anyio.run(Sub().start)
        return weakref.ref(Worker)

    with telemetry.instrument():
        dead = make()
        gc.collect()
        assert dead() is None
    with telemetry.instrument(metered("Kept")) as instrumentation:
        dead = make()  # not covered by this one
        gc.collect()
        assert dead() is None
    assert not instrumentation.active


def test_instrument_takes_machine_classes() -> None:
    with pytest.raises(TypeError, match=r"argument 1 is <class 'int'>"):
        otel.instrument(metered(), int)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="MeteredMachine classes"):
        otel.instrument(metered()())


def test_only_otel_imports_opentelemetry_and_only_its_api() -> None:
    code = (
        "import sys\n"
        "import statemachine_metrics, statemachine_metrics.testing\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'core'\n"
        "import statemachine_metrics.otel\n"
        "loaded = [m for m in sys.modules if m.startswith('opentelemetry.')]\n"
        "assert loaded\n"
        "assert not [m for m in loaded if m.startswith('opentelemetry.sdk')], loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
