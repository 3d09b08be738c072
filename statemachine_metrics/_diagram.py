"""Mermaid diagrams of machine classes (placeholder, being written)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._machine import MeteredMachine


def mermaid(cls: type[MeteredMachine], *, counts: bool = False) -> str:
    raise NotImplementedError
