"""The typed style: every line type-checks under mypy --strict and pyright strict, no plugin."""

from __future__ import annotations

from typing_extensions import assert_type

from statemachine_metrics import MeteredMachine, Trigger


class Door(MeteredMachine, registry=None):
    states = ["shut", "open", "broken"]
    transitions = [["fix", "broken", "shut"]]
    push = Trigger("shut", "open", conditions="unlocked")
    pull = Trigger("open", "shut", after="note")
    kick = Trigger("shut", "broken", conditions="hard") | Trigger("open", "broken")
    wait = Trigger("*", None)
    fix: Trigger

    def unlocked(self) -> bool:
        return True

    def hard(self, force: int = 0) -> bool:
        return force > 5

    def note(self) -> None:
        print(self.state)


class QuietDoor(Door):
    """Reuses Door's definition: its triggers are Door's."""


async def use(door: Door, quiet: QuietDoor) -> bool:
    opened: bool = await door.push()
    assert_type(await door.pull(), bool)
    assert_type(await door.kick(force=9), bool)
    assert_type(await door.fix(), bool)
    assert_type(await quiet.wait(), bool)
    assert_type(Door.push, Trigger)
    return opened and door.state == "shut"
