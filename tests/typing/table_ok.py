"""The table style with the plugin: generated methods are known, with their types."""

from __future__ import annotations

from typing_extensions import assert_type

from statemachine_metrics import MeteredMachine, TaskMachine, Trigger

STATES = ["idle", "running", "error"]


class Worker(MeteredMachine, registry=None):
    states = STATES
    transitions = [
        ["start", "idle", "running"],
        ("finish", "running", "idle"),
        {"trigger": "fail", "source": ["idle", "running"], "dest": "error"},
    ]
    reset = Trigger("error", "idle")
    start: Trigger


class LoggingWorker(Worker):
    """Reuses Worker's definition."""


class Nested(MeteredMachine, registry=None):
    states = [
        "off",
        {"name": "on", "children": ["dim", {"name": "bright", "states": ["warm", "cold"]}]},
    ]
    transitions = [["switch", "off", "on"]]
    auto_transitions = True


class Ordered(MeteredMachine, registry=None):
    states = ["one", "two", "three"]
    ordered_transitions = {"trigger": "cycle"}


class Redefined(Worker):
    states = ["idle", "running", "error", "paused"]
    reset = Trigger(["error", "paused"], "idle")


class Fetch(TaskMachine, registry=None):
    pass


async def use(w: Worker, lw: LoggingWorker, n: Nested, o: Ordered, r: Redefined, f: Fetch) -> None:
    assert_type(await w.start(), bool)
    assert_type(await w.finish(1, reason="x"), bool)
    assert_type(await w.fail(), bool)
    assert_type(await w.reset(), bool)
    assert_type(await w.may_start(), bool)
    assert_type(await w.may_reset(), bool)
    assert_type(w.is_idle(), bool)
    assert_type(w.is_error(allow_substates=True), bool)
    assert_type(await lw.finish(), bool)
    assert_type(lw.is_running(), bool)
    assert_type(await n.switch(), bool)
    assert_type(await n.to_on_bright_cold(), bool)
    assert_type(await o.cycle(), bool)
    assert_type(n.is_on_bright(allow_substates=True), bool)
    assert_type(n.is_on_dim(), bool)
    assert_type(await r.start(), bool)
    assert_type(r.is_paused(), bool)
    assert_type(await f.start(), bool)
    assert_type(await f.may_succeed(), bool)
    assert_type(f.is_cancelled(), bool)
