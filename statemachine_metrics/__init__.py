"""Async state machines with built-in Prometheus metrics, on transitions and anyio."""

from __future__ import annotations

from prometheus_client.registry import REGISTRY as REGISTRY
from transitions import MachineError as MachineError

from ._collector import MachineCollector as MachineCollector
from ._enum import Enum as Enum
from ._events import EventData as EventData
from ._events import TransitionEvent as TransitionEvent
from ._exposition import make_asgi_app as make_asgi_app
from ._exposition import serve_metrics as serve_metrics
from ._format import generate_latest as generate_latest
from ._machine import MeteredMachine as MeteredMachine
from ._machine import TransitionSpec as TransitionSpec
from ._taskmachine import TaskMachine as TaskMachine
from ._trigger import Trigger as Trigger

__all__ = [
    "REGISTRY",
    "Enum",
    "EventData",
    "MachineCollector",
    "MachineError",
    "MeteredMachine",
    "TaskMachine",
    "TransitionEvent",
    "TransitionSpec",
    "Trigger",
    "generate_latest",
    "make_asgi_app",
    "serve_metrics",
]
__version__ = "0.1.0"
