"""Async state machines with built-in Prometheus metrics, on transitions and anyio."""

from __future__ import annotations

from prometheus_client.registry import REGISTRY as REGISTRY

from ._enum import Enum as Enum

__all__ = ["REGISTRY", "Enum"]
__version__ = "0.1.0"
