"""The collector adapter, the metric family of a class, machine lifecycle and scrape safety."""

from __future__ import annotations

import gc
import sys
import threading
import tracemalloc
import urllib.request
from collections import defaultdict

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from statemachine_metrics import MachineCollector, MeteredMachine, serve_metrics

pytestmark = pytest.mark.anyio

STATES = ["idle", "running", "error"]
TRANSITIONS = [
    ["start", "idle", "running"],
    ["finish", "running", "idle"],
    ["fail", ["idle", "running"], "error"],
    ["reset", "error", "idle"],
]


class Worker(MeteredMachine, namespace="coll", labelnames=("worker",), registry=None):
    """Current state of the background worker"""

    states = STATES
    transitions = TRANSITIONS


class Job(MeteredMachine, namespace="coll", registry=None):
    states = STATES
    transitions = TRANSITIONS


class LoggedJob(Job):
    """Shares Job's metrics."""

    def on_enter_running(self) -> None:
        pass


def registry_of(*classes: type[MeteredMachine]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(MachineCollector(*classes))
    return registry


def families(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(registry).decode()
    return {
        family.name: [(sample.labels, sample.value) for sample in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_names_types_and_labels_match_the_design() -> None:
    registry = registry_of(Worker)
    machine = Worker(labels={"worker": "w1"})
    text = generate_openmetrics(registry).decode()
    assert "# TYPE coll_worker_state stateset" in text
    assert "# HELP coll_worker_state Current state of the background worker" in text
    assert "# TYPE coll_worker_state_machines gauge" in text
    assert "# TYPE coll_worker_state_transitions counter" in text
    assert "# TYPE coll_worker_state_duration_seconds histogram" in text
    assert "# TYPE coll_worker_state_errors counter" in text
    assert 'coll_worker_state_transitions_created{from="idle",to="running",trigger="start"}' in text
    assert 'coll_worker_state_duration_seconds_created{coll_worker_state="idle"}' in text
    assert Worker.metric_names() == (
        "coll_worker_state",
        "coll_worker_state_machines",
        "coll_worker_state_transitions_total",
        "coll_worker_state_duration_seconds",
        "coll_worker_state_errors_total",
        "coll_worker_state_oldest_seconds",
        "coll_worker_state_trigger_duration_seconds",
    )
    values = families(registry)
    del machine
    machines = {
        labels["coll_worker_state"]: v for labels, v in values["coll_worker_state_machines"]
    }
    assert machines == {"idle": 1, "running": 0, "error": 0}
    # Every allowed transition is there from the start, at 0 (wildcards expanded).
    ran = {
        (labels["from"], labels["to"], labels["trigger"])
        for labels, _ in values["coll_worker_state_transitions"]
    }
    assert ran == {
        ("idle", "running", "start"),
        ("running", "idle", "finish"),
        ("idle", "error", "fail"),
        ("running", "error", "fail"),
        ("error", "idle", "reset"),
    }


def test_collector_without_arguments_exports_every_class() -> None:
    registry = CollectorRegistry()
    registry.register(MachineCollector())
    names = {family.name for family in registry.collect()}
    assert {"coll_worker_state", "coll_job_state", "coll_worker_state_machines"} <= names

    class Later(MeteredMachine, namespace="coll", registry=None):
        states = ["a"]

    assert "coll_later_state" in {family.name for family in registry.collect()}


def test_subclass_sharing_metrics_is_exported_once() -> None:
    registry = registry_of(Job, LoggedJob)
    job, logged = Job(), LoggedJob()
    assert LoggedJob.metric is Job.metric
    names = [family.name for family in registry.collect()]
    assert len(names) == len(set(names)) == 7
    counts = families(registry)["coll_job_state_machines"]
    assert {labels["coll_job_state"]: v for labels, v in counts}["idle"] == 2
    del job, logged


def test_collector_never_emits_two_families_with_one_name() -> None:
    def make() -> type[MeteredMachine]:
        class Twin(MeteredMachine, namespace="coll", registry=None):
            states = ["a", "b"]

        return Twin

    first, second = make(), make()
    registry = registry_of(first, second)
    names = [family.name for family in registry.collect()]
    assert names.count("coll_twin_state") == 1
    everything = [family.name for family in MachineCollector().collect()]
    assert everything.count("coll_twin_state") == 1


def test_registering_a_class_twice_fails_like_prometheus_client() -> None:
    registry = registry_of(Worker)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(MachineCollector(Worker))


def test_class_registry_keyword_registers_through_the_adapter() -> None:
    registry = CollectorRegistry()

    class Registered(MeteredMachine, namespace="coll", registry=registry):
        states = ["a", "b"]

    machine = Registered()
    assert registry.get_sample_value("coll_registered_state", {"coll_registered_state": "a"}) == 1
    assert machine.state == "a"
    with pytest.raises(ValueError, match="Registered: its metric names are taken"):

        class Registered(MeteredMachine, namespace="coll", registry=registry):  # type: ignore[no-redef]
            states = ["a", "b"]


@pytest.mark.parametrize("bad", [object(), int, MeteredMachine])
def test_collector_refuses_what_is_not_a_concrete_machine_class(bad: object) -> None:
    with pytest.raises(TypeError, match="MachineCollector"):
        MachineCollector(bad)  # type: ignore[arg-type]


async def test_label_series_goes_with_its_last_machine() -> None:
    registry = registry_of(Worker)
    a = Worker(labels={"worker": "shared"})
    b = Worker(labels={"worker": "shared"})
    await a.start()
    labels = {"worker": "shared", "coll_worker_state": "running"}
    assert registry.get_sample_value("coll_worker_state", labels) == 1
    await a.aclose()
    # b still holds the series: last transition wins, and it stays.
    assert registry.get_sample_value("coll_worker_state", labels) == 1
    async with b:
        await b.fail()
    assert registry.get_sample_value("coll_worker_state", labels) is None
    assert (
        registry.get_sample_value("coll_worker_state_machines", {"coll_worker_state": "error"}) == 0
    )


async def test_dropping_the_last_reference_ends_a_machine_at_once() -> None:
    registry = registry_of(Worker)
    machine = Worker(labels={"worker": "dropped"})
    await machine.start()
    before = registry.get_sample_value(
        "coll_worker_state_machines", {"coll_worker_state": "running"}
    )
    gc.disable()
    try:
        del machine
        labels = {"worker": "dropped", "coll_worker_state": "running"}
        assert registry.get_sample_value("coll_worker_state", labels) is None
        assert (
            registry.get_sample_value(
                "coll_worker_state_machines", {"coll_worker_state": "running"}
            )
            == before - 1
        )  # type: ignore[operator]
    finally:
        gc.enable()


async def test_unlabelled_class_keeps_its_series_with_the_last_state() -> None:
    class Solo(MeteredMachine, namespace="coll", registry=None):
        states = ["a", "b"]
        transitions = [["go", "a", "b"]]

    registry = registry_of(Solo)
    async with Solo() as solo:
        await solo.go()
    assert registry.get_sample_value("coll_solo_state", {"coll_solo_state": "b"}) == 1
    assert registry.get_sample_value("coll_solo_state_machines", {"coll_solo_state": "b"}) == 0


async def test_a_machine_in_a_reference_cycle_is_collected() -> None:
    registry = registry_of(Worker)

    class Holder:
        pass

    machine = Worker(labels={"worker": "cycle"})
    holder = Holder()
    holder.machine = machine  # type: ignore[attr-defined]
    machine.holder = holder  # type: ignore[attr-defined]
    del machine, holder
    gc.collect()
    labels = {"worker": "cycle", "coll_worker_state": "idle"}
    assert registry.get_sample_value("coll_worker_state", labels) is None


def test_churn_of_machines_leaves_memory_flat() -> None:
    def churn(rounds: int) -> None:
        for i in range(rounds):
            batch = [Worker(labels={"worker": f"{i}-{j}"}) for j in range(1_000)]
            del batch

    tracemalloc.start()
    try:
        churn(5)  # the tables holding 1,000 live machines reach their size
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        churn(50)  # 50,000 more machines, each with its own label set
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth < 8 * 1024, f"memory grew by {growth} bytes"
    assert Worker.metric._metrics == {}


async def test_scrapes_in_another_thread_see_consistent_machines() -> None:
    """Scrape continuously while the event loop creates, moves and drops machines."""
    registry = registry_of(Worker)
    stop = threading.Event()
    problems: list[str] = []
    scrapes = 0

    def scraper() -> None:
        nonlocal scrapes
        while not stop.is_set():
            try:
                text = generate_latest(registry).decode()
            except Exception as exc:  # a scrape must never raise
                problems.append(repr(exc))
                return
            scrapes += 1
            ones: dict[str, float] = defaultdict(float)
            counted = 0.0
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "coll_worker_state":
                        ones[sample.labels["worker"]] += sample.value
                    elif sample.name == "coll_worker_state_machines":
                        counted += sample.value
            if any(total != 1 for total in ones.values()):
                problems.append(f"a label set without exactly one state: {dict(ones)}")
            if counted != len(ones):
                problems.append(f"{counted} machines counted for {len(ones)} label sets")

    thread = threading.Thread(target=scraper)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to find races
    thread.start()
    try:
        with anyio.fail_after(30):
            rounds = 0
            while scrapes < 30:
                # Label sets unique to a round: a machine of the last round may outlive it
                # (the loop variable below), and two machines sharing a label set are one
                # series but two counts.
                rounds += 1
                machines = [Worker(labels={"worker": f"{rounds}-{i}"}) for i in range(300)]
                for machine in machines:
                    await machine.start()
                for machine in machines[::2]:
                    await machine.fail()
                del machines[::3]
                await anyio.lowlevel.checkpoint()
                del machines
    finally:
        stop.set()
        thread.join(timeout=30)
        sys.setswitchinterval(interval)
    assert not problems, problems[:3]


async def test_serve_metrics_serves_and_stops_with_its_task() -> None:
    registry = registry_of(Worker)
    machine = Worker(labels={"worker": "served"})
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_metrics, 0, "127.0.0.1", registry)
        url = f"http://127.0.0.1:{port}/metrics"
        body = await anyio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=5).read())
        assert b'coll_worker_state{coll_worker_state="idle",worker="served"} 1.0' in body
        tg.cancel_scope.cancel()
    with pytest.raises(OSError, match="refused"):
        await anyio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=1))
    del machine


def test_created_series_follow_prometheus_client_switch() -> None:
    import prometheus_client

    machine = Worker(labels={"worker": "created"})
    registry = registry_of(Worker)
    assert b"_created" in generate_latest(registry)
    prometheus_client.disable_created_metrics()
    try:
        assert b"_created" not in generate_latest(registry)
    finally:
        prometheus_client.enable_created_metrics()
    del machine


def test_collector_skips_a_class_whose_derived_names_are_taken() -> None:
    class First(MeteredMachine, registry=None, name="coll_dup"):
        states = ["a", "b"]

    class Second(MeteredMachine, registry=None, name="coll_dup_machines"):
        states = ["m"]

    for collector in (MachineCollector(First, Second), MachineCollector()):
        names = [family.name for family in collector.collect()]
        assert names.count("coll_dup_machines") == 1
        assert "coll_dup" in names
    registry = registry_of(First, Second)
    assert generate_latest(registry).decode().count("# TYPE coll_dup_machines gauge") == 1


async def test_a_cleared_label_set_comes_back_with_a_new_machine() -> None:
    registry = registry_of(Worker)
    first = Worker(labels={"worker": "cleared"})
    Worker.metric.clear()
    labels = {"worker": "cleared", "coll_worker_state": "idle"}
    assert registry.get_sample_value("coll_worker_state", labels) is None
    second = Worker(labels={"worker": "cleared"})
    assert registry.get_sample_value("coll_worker_state", labels) == 1
    await first.start()  # machines bound to the label set share the series again
    running = {"worker": "cleared", "coll_worker_state": "running"}
    assert registry.get_sample_value("coll_worker_state", running) == 1
    del first, second
    assert registry.get_sample_value("coll_worker_state", running) is None
