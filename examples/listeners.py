"""Listeners: your own code after every transition, here an audit log and a waiter.

An order pipeline with two listeners:

- `AuditLog`, added to the class, writes one JSON line per transition of every order:
  which order, the trigger, where it came from and went, and how long it stayed there.
- a listener added to one machine wakes the task waiting for that order to ship.

    python examples/listeners.py

Listeners run synchronously, in the task that ran the transition, once the state and the
metrics changed; one that raises is logged and the transition stands.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from statemachine_metrics import MeteredMachine, TransitionEvent, Trigger

# A registry of its own, so that importing this module never clashes with other metrics.
REGISTRY = CollectorRegistry()


class Order(MeteredMachine, namespace="shop", labelnames=("order",), registry=REGISTRY):
    """State of an order"""

    states = ["placed", "paid", "shipped", "cancelled"]
    pay = Trigger("placed", "paid")
    ship = Trigger("paid", "shipped")
    cancel = Trigger(["placed", "paid"], "cancelled")
    note = Trigger("*", None)  # internal: stays where it is


class AuditLog:
    """A listener: one JSON line per transition."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, event: TransitionEvent) -> None:
        record = {
            "order": event.machine.labels["order"],
            "trigger": event.trigger,
            "from": event.source,
            "to": event.dest,
            "internal": event.internal,
            # None for an internal transition, which does not leave its state.
            "stayed_seconds": None if event.elapsed is None else round(event.elapsed, 6),
        }
        print(json.dumps(record), file=self.out)


async def shipped(order: Order, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED) -> None:
    """Wait until `order` is shipped, woken by a listener on that one machine."""
    done = anyio.Event()

    def wake(event: TransitionEvent) -> None:
        if event.dest == "shipped":
            done.set()

    order.add_listener(wake)
    task_status.started()  # listening: the order may move
    try:
        await done.wait()
    finally:
        order.remove_listener(wake)


async def run(out: TextIO = sys.stdout) -> None:
    audit = AuditLog(out)
    Order.add_listener(audit)  # every order, and every subclass's
    try:
        first = Order(labels={"order": "A-1"})
        second = Order(labels={"order": "A-2"})
        async with anyio.create_task_group() as tg:
            await tg.start(shipped, first)
            await first.pay()
            await first.note()
            await second.cancel()
            await anyio.sleep(0.01)
            await first.ship()
        print("A-1 shipped", file=out)
    finally:
        Order.remove_listener(audit)


if __name__ == "__main__":
    anyio.run(run)
