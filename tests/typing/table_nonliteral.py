"""Definitions the plugin cannot read: no false errors, the generated methods are Any."""

from __future__ import annotations

from statemachine_metrics import MeteredMachine


def make_states() -> list[str]:
    return ["a", "b"]


class Computed(MeteredMachine, registry=None):
    states = make_states()
    transitions = [[name, "a", "b"] for name in ("go", "jump")]


class HalfLiteral(MeteredMachine, registry=None):
    states = ["a", "b"]
    transitions = [["go", "a", "b"], *[["jump", "b", "a"]]]


async def use(c: Computed, h: HalfLiteral) -> None:
    await c.go()
    c.is_a()
    await h.jump()
    await h.go()
