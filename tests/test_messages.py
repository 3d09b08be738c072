"""What a user meets first: error messages, unawaited ``may_<trigger>()``, and the machine-level
callbacks and modes that come from transitions, on asyncio and trio."""

from __future__ import annotations

import gc
import importlib
import logging
import re
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry

from statemachine_metrics import EventData, MachineCollector, MachineError, MeteredMachine

pytestmark = pytest.mark.anyio

STATES = ["idle", "running", "error"]
TRANSITIONS: list[Any] = [
    ["start", "idle", "running"],
    ["finish", "running", "idle"],
    ["fail", ["idle", "running"], "error"],
    ["reset", "error", "idle"],
    ["stop", "running", "idle"],
]


def metered(name: str = "Worker", /, *, module: str | None = None, **options: Any) -> Any:
    """A fresh machine class; class keywords and members both go in `options`."""
    names = ("labelnames", "registry", "namespace", "name")
    keywords = {k: options.pop(k) for k in names if k in options}
    keywords.setdefault("registry", CollectorRegistry())
    namespace: dict[str, Any] = {"states": STATES, "transitions": TRANSITIONS, **options}
    if module is not None:
        namespace["__module__"] = module
    cls: Any = type(name, (MeteredMachine,), namespace, **keywords)
    cls.registry_ = keywords["registry"]
    return cls


def message(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    error = excinfo.value
    return str(error.value) if isinstance(error, MachineError) else str(error)


# -- may_<trigger>() not awaited -----------------------------------------------------------


async def test_an_unawaited_may_refuses_to_be_true_or_false(anyio_backend: str) -> None:
    Worker = metered()
    w = Worker()

    def forgot_await() -> None:
        if w.may_start():
            pytest.fail("an unawaited may_start() passed as true")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match=r"may_start\(\) must be awaited") as excinfo:
            forgot_await()
        assert "await" in str(excinfo.value)
        with pytest.raises(TypeError, match="await"):
            assert not w.may_finish()
        del excinfo
        gc.collect()
    never_awaited = [w for w in caught if "never awaited" in str(w.message)]
    assert never_awaited == []
    assert w.state == "idle"


async def test_an_awaited_may_answers(anyio_backend: str) -> None:
    Worker = metered()
    w = Worker()
    assert await w.may_start() is True
    assert await w.may_finish() is False
    await w.start()
    assert await w.may_finish() is True
    assert await w.may_reset() is False


# -- constructor mistakes ------------------------------------------------------------------


def test_a_label_given_as_a_keyword_points_to_labels() -> None:
    Worker = metered(labelnames=("worker",))
    with pytest.raises(TypeError, match=re.escape("labels={'worker': ...}")) as excinfo:
        Worker(worker="w1")
    assert "Worker" in str(excinfo.value)
    assert "'worker'" in str(excinfo.value)


def test_an_unexpected_keyword_without_labelnames_is_named() -> None:
    Worker = metered()
    with pytest.raises(TypeError, match="'colour'") as excinfo:
        Worker(colour="blue")
    assert "Worker" in str(excinfo.value)
    assert "labels={" not in str(excinfo.value)  # nothing to suggest: it has no labels


def test_a_none_label_value_is_refused_by_name() -> None:
    Worker = metered(labelnames=("pool", "worker"))
    with pytest.raises(ValueError, match="'worker'") as excinfo:
        Worker(labels={"pool": "p", "worker": None})
    text = str(excinfo.value)
    assert text.startswith("Worker")
    assert "None" in text
    assert "'pool'" not in text
    One = metered(labelnames=("worker",))
    with pytest.raises(ValueError, match=r"'worker'.*None"):
        One(labels={"worker": None})
    # Other values become strings, as prometheus_client does.
    w = Worker(labels={"pool": "p", "worker": 7})
    assert w.labels == {"pool": "p", "worker": "7"}


# -- MachineError ----------------------------------------------------------------------------


async def test_a_machine_error_names_class_labels_and_the_states_that_allow_it(
    anyio_backend: str,
) -> None:
    Worker = metered(labelnames=("worker",))
    w = Worker(labels={"worker": "w1"})
    with pytest.raises(MachineError) as excinfo:
        await w.finish()
    text = message(excinfo)
    assert text.startswith("Worker")
    assert "'worker': 'w1'" in text
    assert "idle" in text  # the state it is in
    allowed = re.search(r"allowed from (.*)", text)
    assert allowed is not None, text
    assert re.findall(r"\w+", allowed.group(1)) == ["running"]

    await w.start()
    await w.fail()
    with pytest.raises(MachineError) as excinfo:
        await w.fail()
    allowed = re.search(r"allowed from (.*)", message(excinfo))
    assert allowed is not None
    assert set(re.findall(r"\w+", allowed.group(1))) == {"idle", "running"}


async def test_a_machine_error_of_a_class_without_labels(anyio_backend: str) -> None:
    Worker = metered()
    w = Worker()
    with pytest.raises(MachineError) as excinfo:
        await w.reset()
    text = message(excinfo)
    assert text.startswith("Worker")
    assert "{" not in text
    assert re.search(r"allowed from error\b", text), text


# -- trigger() by name -----------------------------------------------------------------------


async def test_a_misspelled_trigger_name_suggests_the_right_one(anyio_backend: str) -> None:
    Worker = metered()
    w = Worker()
    with pytest.raises(AttributeError, match="did you mean 'start'") as excinfo:
        await w.trigger("strat")
    text = str(excinfo.value)
    assert text.startswith("Worker")
    for trigger in ("start", "finish", "fail", "reset", "stop"):
        assert trigger in text
    with pytest.raises(AttributeError) as excinfo:
        await w.trigger("zzz")
    assert "did you mean" not in str(excinfo.value)
    assert "start, finish, fail, reset, stop" in str(excinfo.value)
    assert w.state == "idle"


# -- metric names taken in a registry ----------------------------------------------------------


def assert_clash_message(text: str, cls: str, other_module: str, own_module: str) -> None:
    assert text.startswith(f"{cls}: its metric names are taken in its registry"), text
    assert other_module in text
    assert own_module in text
    for suggestion in ("name=", "namespace=", "registry=None"):
        assert suggestion in text
    # Not prometheus_client's dump of every clashing sample name.
    assert "Duplicated timeseries" not in text
    assert "_bucket" not in text
    assert "_created" not in text


def test_two_classes_with_one_name_in_one_registry() -> None:
    registry = CollectorRegistry()
    metered("Worker", module="app.first", registry=registry)
    with pytest.raises(ValueError, match=r"^Worker: its metric names are taken") as excinfo:
        metered("Worker", module="app.second", registry=registry)
    assert_clash_message(str(excinfo.value), "Worker", "app.first", "app.second")
    # The suggested ways out work.
    metered("Worker", module="app.second", registry=registry, namespace="second")
    metered("Worker", module="app.second", registry=None)


def test_a_clash_in_a_registry_that_exports_every_class() -> None:
    # A registry whose MachineCollector() exports every class: the second class with one
    # name in it would be dropped from the exposition, so it must fail at creation.
    registry = CollectorRegistry()
    registry.register(MachineCollector())
    first = metered("Worker", module="app.first", registry=registry, name="every_class_clash_state")
    with pytest.raises(ValueError, match=r"^Worker: its metric names are taken") as excinfo:
        metered("Worker", module="app.second", registry=registry, name="every_class_clash_state")
    assert_clash_message(str(excinfo.value), "Worker", "app.first", "app.second")
    assert first.metric_names()  # alive until here: a collected class no longer clashes


def test_a_reloaded_module_gets_the_clash_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shared_registry_fixture.py").write_text(
        "from prometheus_client import CollectorRegistry\nregistry = CollectorRegistry()\n"
    )
    (tmp_path / "reloaded_jobs_fixture.py").write_text(
        textwrap.dedent(
            """
            from statemachine_metrics import MeteredMachine
            from shared_registry_fixture import registry

            class Job(MeteredMachine, registry=registry):
                states = ["queued", "done"]
                transitions = [["finish", "queued", "done"]]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("reloaded_jobs_fixture")
        with pytest.raises(ValueError, match=r"^Job: its metric names are taken") as excinfo:
            importlib.reload(module)
        assert_clash_message(
            str(excinfo.value), "Job", "reloaded_jobs_fixture", "reloaded_jobs_fixture"
        )
        assert "reload" in str(excinfo.value)
    finally:
        for name in ("reloaded_jobs_fixture", "shared_registry_fixture"):
            sys.modules.pop(name, None)


# -- machine-level callbacks, as transitions' AsyncMachine runs them ---------------------------


async def test_machine_callbacks_run_in_transitions_order(anyio_backend: str) -> None:
    calls: list[str] = []

    def note(what: str) -> Any:
        def callback(self: Any, *args: Any, **kwargs: Any) -> None:
            calls.append(f"{what}{args}{kwargs}")

        return callback

    async def after_state_change(self: Any, *args: Any, **kwargs: Any) -> None:
        await anyio.lowlevel.checkpoint()
        calls.append(f"after_state_change{args}{kwargs}")

    Worker = metered(
        prepare_event="on_prepare_event",
        before_state_change=["on_before_state_change"],
        after_state_change="on_after_state_change",
        finalize_event="on_finalize_event",
        on_prepare_event=note("prepare_event"),
        on_before_state_change=note("before_state_change"),
        on_after_state_change=after_state_change,
        on_finalize_event=note("finalize_event"),
        on_exit_idle=note("exit idle"),
        on_enter_running=note("enter running"),
        transitions=[
            {
                "trigger": "start",
                "source": "idle",
                "dest": "running",
                "prepare": "on_prepare",
                "before": "on_before",
                "after": "on_after",
            },
            *TRANSITIONS[1:],
        ],
        on_prepare=note("prepare"),
        on_before=note("before"),
        on_after=note("after"),
    )
    w = Worker()
    assert await w.start(1, k=2) is True
    assert calls == [
        "prepare_event(1,){'k': 2}",
        "prepare(1,){'k': 2}",
        "before_state_change(1,){'k': 2}",
        "before(1,){'k': 2}",
        "exit idle(1,){'k': 2}",
        "enter running(1,){'k': 2}",
        "after(1,){'k': 2}",
        "after_state_change(1,){'k': 2}",
        "finalize_event(1,){'k': 2}",
    ]


async def test_finalize_event_runs_after_an_exception_and_its_own_error_is_logged(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def on_enter_running(self: Any) -> None:
        raise RuntimeError("enter failed")

    def finalize(self: Any) -> None:
        calls.append(f"finalize in {self.state}")
        raise KeyError("finalize failed")

    Worker = metered(
        finalize_event="finalize", finalize=finalize, on_enter_running=on_enter_running
    )
    w = Worker()
    with caplog.at_level(logging.ERROR, logger="statemachine_metrics"):
        with pytest.raises(RuntimeError, match="enter failed"):
            await w.start()  # the trigger's own error, not finalize_event's
        assert calls == ["finalize in running"]
        assert await w.finish() is True  # finalize_event raises: logged, not raised
    assert calls == ["finalize in running", "finalize in idle"]
    assert w.state == "idle"
    logged = [r for r in caplog.records if r.name == "statemachine_metrics"]
    assert len(logged) == 2
    for record in logged:
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], KeyError)
        assert "finalize_event" in record.getMessage()


async def test_on_exception_takes_the_error_and_the_trigger_returns_false(
    anyio_backend: str,
) -> None:
    handled: list[tuple[Any, ...]] = []

    async def on_enter_running(self: Any, *args: Any) -> None:
        await anyio.lowlevel.checkpoint()
        raise RuntimeError("enter failed")

    def handle(self: Any, *args: Any) -> None:
        handled.append(args)

    Worker = metered(on_exception=["handle"], handle=handle, on_enter_running=on_enter_running)
    w = Worker()
    assert await w.start(5) is False
    assert handled == [(5,)]  # with the trigger's arguments
    assert w.state == "running"  # the state changed before the callback raised
    # An invalid trigger goes to on_exception too, as in AsyncMachine.
    assert await w.reset(6) is False
    assert handled == [(5,), (6,)]
    assert w.state == "running"
    for trigger, error in (("start", "RuntimeError"), ("reset", "MachineError")):
        counted = Worker.registry_.get_sample_value(
            "worker_state_errors_total", {"trigger": trigger, "error": error}
        )
        assert counted == 1.0, (trigger, error)


async def test_on_final_runs_when_a_final_state_is_entered(anyio_backend: str) -> None:
    calls: list[str] = []
    Worker = metered(
        states=["idle", "running", {"name": "done", "final": True, "on_final": "state_final"}],
        transitions=[["start", "idle", "running"], ["finish", "running", "done"]],
        on_final="machine_final",
        state_final=lambda self: calls.append("state on_final"),
        machine_final=lambda self: calls.append("machine on_final"),
        on_enter_done=lambda self: calls.append("enter done"),
    )
    w = Worker()
    await w.start()
    assert calls == []
    await w.finish()
    assert calls == ["enter done", "state on_final", "machine on_final"]


async def test_send_event_gives_callbacks_one_event_data(anyio_backend: str) -> None:
    seen: dict[str, EventData] = {}
    fields: dict[str, tuple[Any, ...]] = {}

    def keep(where: str) -> Any:
        def callback(self: Any, *args: Any, **kwargs: Any) -> None:
            assert kwargs == {}
            assert len(args) == 1
            event = args[0]
            seen[where] = event
            transition = event.transition
            fields[where] = (
                event.state.name,
                None if transition is None else (transition.source, transition.dest),
                event.result,
                event.error,
            )

        return callback

    def boom(self: Any, event: EventData) -> None:
        raise ValueError("before failed")

    Worker = metered(
        send_event=True,
        prepare_event="on_prepare_event",
        on_prepare_event=keep("prepare_event"),
        on_exit_idle=keep("exit"),
        on_enter_running=keep("enter"),
        finalize_event="on_finalize",
        on_finalize=keep("finalize"),
        on_exception="on_error",
        on_error=keep("on_exception"),
        transitions=[
            *TRANSITIONS,
            {"trigger": "crash", "source": "running", "dest": "error", "before": "boom"},
        ],
        boom=boom,
    )
    w = Worker()
    assert await w.start(1, k=2) is True
    event = seen["enter"]
    assert isinstance(event, EventData)
    assert event.machine is w
    assert event.model is w
    assert event.event.name == "start"
    assert event.args == (1,)
    assert event.kwargs == {"k": 2}
    assert fields["prepare_event"][0] == "idle"
    assert fields["exit"] == ("idle", ("idle", "running"), False, None)
    assert fields["enter"] == ("running", ("idle", "running"), False, None)
    assert fields["finalize"] == ("running", ("idle", "running"), True, None)

    assert await w.crash() is False  # on_exception took the error
    error = seen["on_exception"].error
    assert isinstance(error, ValueError)
    assert seen["on_exception"].event.name == "crash"
    assert seen["finalize"].error is error
    assert w.state == "running"


async def test_queued_runs_a_callbacks_trigger_after_the_current_transition(
    anyio_backend: str,
) -> None:
    calls: list[str] = []

    async def on_enter_running(self: Any) -> None:
        result = await self.finish()  # queued: returns True at once
        calls.append(f"finish returned {result} in {self.state}")

    Worker = metered(
        queued=True,
        on_enter_running=on_enter_running,
        on_enter_idle=lambda self: calls.append("enter idle"),
        transitions=[
            {"trigger": "start", "source": "idle", "dest": "running", "after": "note_after"},
            *TRANSITIONS[1:],
        ],
        note_after=lambda self: calls.append(f"after start in {self.state}"),
    )
    w = Worker()
    moves: list[tuple[str, str, str]] = []
    w.add_listener(lambda e: moves.append((e.trigger, e.source, e.dest)))
    assert await w.start() is True
    assert calls == ["finish returned True in running", "after start in running", "enter idle"]
    assert w.state == "idle"
    assert moves == [("start", "idle", "running"), ("finish", "running", "idle")]


async def test_not_queued_a_callbacks_trigger_runs_nested(anyio_backend: str) -> None:
    calls: list[str] = []

    async def on_enter_running(self: Any) -> None:
        result = await self.finish()
        calls.append(f"finish returned {result} in {self.state}")

    Worker = metered(
        on_enter_running=on_enter_running,
        on_enter_idle=lambda self: calls.append("enter idle"),
    )
    w = Worker()
    assert await w.start() is True
    assert calls == ["enter idle", "finish returned True in idle"]


class Counter:
    """A callable object: called as given, never copied."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs))


async def test_callbacks_given_as_names_and_as_callables_of_any_kind(
    anyio_backend: str,
) -> None:
    plain = mock.Mock(return_value=None)
    awaited = mock.AsyncMock(return_value=None)
    counter = Counter()
    calls: list[str] = []

    async def by_function(*args: Any, **kwargs: Any) -> None:
        await anyio.lowlevel.checkpoint()
        calls.append(f"function{args}{kwargs}")

    def by_name(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(f"method{args}{kwargs}")

    Worker = metered(
        by_name=by_name,
        transitions=[
            {
                "trigger": "start",
                "source": "idle",
                "dest": "running",
                "before": [plain, "by_name"],
                "after": [awaited, counter, by_function],
                "conditions": [lambda *args, **kwargs: kwargs.get("go", False)],
            },
            *TRANSITIONS[1:],
        ],
    )
    w = Worker()
    assert await w.start(3, go=False) is False
    plain.assert_not_called()
    assert await w.start(3, go=True) is True
    plain.assert_called_once_with(3, go=True)
    awaited.assert_awaited_once_with(3, go=True)
    assert counter.calls == [((3,), {"go": True})]  # on the object given: not a copy
    assert calls == ["method(3,){'go': True}", "function(3,){'go': True}"]
