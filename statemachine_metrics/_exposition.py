"""Serving ``/metrics`` from inside an anyio task group."""

from __future__ import annotations

import anyio
from anyio.abc import TaskStatus
from prometheus_client import start_http_server
from prometheus_client.registry import REGISTRY, CollectorRegistry

__all__ = ["serve_metrics"]


async def serve_metrics(
    port: int = 8000,
    addr: str = "127.0.0.1",
    registry: CollectorRegistry = REGISTRY,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `registry` on ``http://addr:port/metrics`` until cancelled.

    `prometheus_client.start_http_server` in a task you own: the server stops, and its
    thread ends, when the task is cancelled. Start it with ``await tg.start(...)`` to get the
    bound port (useful with ``port=0``):

        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_metrics, 8000)
            ...
            tg.cancel_scope.cancel()

    Binds to loopback unless told otherwise.
    """
    server, thread = start_http_server(port, addr=addr, registry=registry)
    try:
        task_status.started(server.server_port)
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.shutdown)
            server.server_close()
            await anyio.to_thread.run_sync(thread.join)
