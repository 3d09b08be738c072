"""Coroutine tracking, TaskMachine and state timeouts (placeholder, being written)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._machine import MeteredMachine


class Track:
    def __init__(self, machine: MeteredMachine, *triggers: str | None) -> None:
        raise NotImplementedError


async def enter(machine: MeteredMachine) -> None:
    return None


async def exit(machine: MeteredMachine) -> None:
    return None


def check_timeouts(cls: type[Any]) -> None:
    return None
