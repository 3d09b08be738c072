"""The typed style's mistakes, each reported by both checkers on its line."""

from __future__ import annotations

from statemachine_metrics import MeteredMachine, Trigger


class Door(MeteredMachine, registry=None):
    states = ["shut", "open"]
    transitions = [["pull", "open", "shut"]]
    push = Trigger("shut", "open")
    pull: Trigger


async def use(door: Door) -> str:
    await door.psuh()  # mypy: attr-defined  pyright: reportAttributeAccessIssue
    door.push()  # mypy: unused-coroutine  pyright: reportUnusedCoroutine
    door.pull()  # mypy: unused-coroutine  pyright: reportUnusedCoroutine
    pushed: str = await door.push()  # mypy: assignment  pyright: reportAssignmentType
    pulled: str = await door.pull()  # mypy: assignment  pyright: reportAssignmentType
    return pushed + pulled
