"""The table style with the plugin: misspelled generated methods are errors."""

from __future__ import annotations

from statemachine_metrics import MeteredMachine

TRANSITIONS = [["start", "idle", "running"], ["stop", "running", "idle"]]


class Worker(MeteredMachine, registry=None):
    states = ["idle", "running"]
    transitions = TRANSITIONS


async def use(w: Worker) -> str:
    await w.strat()  # mypy: attr-defined
    await w.may_stopp()  # mypy: attr-defined
    w.is_runing()  # mypy: attr-defined
    w.start()  # mypy: unused-coroutine
    text: str = await w.stop()  # mypy: assignment
    return text
