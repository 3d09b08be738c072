"""A machine definition shared by the listener, observability and OpenTelemetry tests."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from statemachine_metrics import MeteredMachine

STATES = ["idle", "running", "error"]
TRANSITIONS: list[Any] = [
    ["start", "idle", "running"],
    ["finish", "running", "idle"],
    ["fail", ["idle", "running"], "error"],
    ["reset", "error", "idle"],
    {"trigger": "heartbeat", "source": "running", "dest": None},
    {"trigger": "restart", "source": "running", "dest": "running"},
    {"trigger": "start_if", "source": "idle", "dest": "running", "conditions": "allowed"},
]


def metered(name: str = "Worker", base: type[Any] = MeteredMachine, **members: Any) -> Any:
    """A fresh machine class in its own registry, kept as `cls.registry_` (`labelnames` is
    the class keyword, the rest are class members), so tests never clash on names."""
    registry = CollectorRegistry()
    labelnames = members.pop("labelnames", ())
    namespace: dict[str, Any] = {
        "allowed": False,
        "states": STATES,
        "transitions": TRANSITIONS,
        **members,
    }
    options: dict[str, Any] = {"registry": registry}
    if labelnames:
        options["labelnames"] = labelnames
    cls: Any = type(name, (base,), namespace, **options)
    cls.registry_ = registry
    return cls
