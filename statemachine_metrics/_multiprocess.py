"""Machine metrics in prometheus_client's multiprocess mode (placeholder, being written)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ._family import Family


class FamilyMirror(Protocol):
    """Copies a family's updates into the multiprocess value files."""

    def attach(self, key: tuple[str, ...] | None, state: int) -> None: ...

    def detach(self, key: tuple[str, ...] | None, state: int, removed: bool) -> None: ...

    def moved(
        self, key: tuple[str, ...] | None, src: int, dst: int, slot: int, elapsed: float
    ) -> None: ...

    def counted(self, slot: int) -> None: ...

    def error(self, trigger: str, error: str) -> None: ...


def family_mirror(family: Family) -> FamilyMirror | None:
    """The mirror for `family` when multiprocess mode is on, else None."""
    return None
