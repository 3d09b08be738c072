"""Serving ``/metrics``: an ASGI app, and a server task for an anyio task group.

Both negotiate the format as `prometheus_client`'s own server and ASGI app do (the
``Accept`` header picks the text format or OpenMetrics and the name escaping, gzip when
the client accepts it, ``name[]`` query parameters to restrict the output), and format
through `generate_latest`, which writes machine families itself.
"""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from functools import partial
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
from anyio.abc import TaskStatus
from prometheus_client import exposition as text_exposition
from prometheus_client.openmetrics import exposition as om
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from ._format import generate

__all__ = ["make_asgi_app", "serve_metrics"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Encoder = Callable[[Collector], bytes]


def _negotiate(accept: str | None) -> tuple[Encoder, str]:
    """The encoder and content type prometheus_client picks for `accept`, encoding with ours."""
    encoder, content_type = text_exposition.choose_encoder(accept or "")
    function = getattr(encoder, "func", encoder)
    keywords: dict[str, Any] = getattr(encoder, "keywords", {})
    if function is text_exposition.generate_latest:
        openmetrics = False
    elif function is om.generate_latest:
        openmetrics = True
    else:  # a format of a newer prometheus_client: let it write it
        return encoder, content_type
    ours = partial(
        generate,
        openmetrics=openmetrics,
        escaping=keywords.get("escaping", om.UNDERSCORES),
        version=keywords.get("version", "1.0.0"),
    )
    return ours, content_type


def _bake(
    registry: Collector,
    accept: str | None,
    accept_encoding: str | None,
    params: dict[str, list[str]],
    disable_compression: bool,
) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status, headers and body of a scrape."""
    encoder, content_type = _negotiate(accept)
    if "name[]" in params:
        restricted = registry.restricted_registry(params["name[]"])  # type: ignore[attr-defined]
        output = encoder(restricted)
    else:
        output = encoder(registry)
    headers = [("Content-Type", content_type)]
    if not disable_compression and text_exposition.gzip_accepted(accept_encoding or ""):
        output = gzip.compress(output)
        headers.append(("Content-Encoding", "gzip"))
    return "200 OK", headers, output


def make_asgi_app(registry: Collector = REGISTRY, disable_compression: bool = False) -> ASGIApp:
    """An ASGI app serving `registry`, as `prometheus_client.make_asgi_app` does, faster.

    Content negotiation, gzip and ``name[]`` filters are prometheus_client's; machine
    families are formatted by `generate_latest`. Mount it in any ASGI framework:

        from statemachine_metrics import make_asgi_app

        app.mount("/metrics", make_asgi_app())  # Starlette, FastAPI
    """

    async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope.get("type") == "http"
        params = parse_qs(scope.get("query_string", b"").decode("utf8"))
        headers: Iterable[tuple[bytes, bytes]] = scope.get("headers") or ()
        accept = ",".join(v.decode("utf8") for k, v in headers if k.decode().lower() == "accept")
        encoding = ",".join(
            v.decode("utf8") for k, v in headers if k.decode().lower() == "accept-encoding"
        )
        status, response_headers, output = _bake(
            registry, accept, encoding, params, disable_compression
        )
        payload = await receive()
        if payload.get("type") == "http.request":
            await send(
                {
                    "type": "http.response.start",
                    "status": int(status.split(" ")[0]),
                    "headers": [(k.encode("utf8"), v.encode("utf8")) for k, v in response_headers],
                }
            )
            await send({"type": "http.response.body", "body": output})

    return metrics_app


def _make_wsgi_app(registry: Collector) -> Callable[..., list[bytes]]:
    """The WSGI app of `serve_metrics`: prometheus_client's `make_wsgi_app`, with our format."""

    def metrics_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        headers: list[tuple[str, str]]
        if method == "OPTIONS":
            status, headers, output = "200 OK", [("Allow", "OPTIONS,GET")], b""
        elif method != "GET":
            status = "405 Method Not Allowed"
            headers = [("Allow", "OPTIONS,GET")]
            output = f"# HTTP {status}: {method}; use OPTIONS or GET\n".encode()
        elif environ["PATH_INFO"] == "/favicon.ico":
            status, headers, output = "200 OK", [], b""
        else:
            status, headers, output = _bake(
                registry,
                environ.get("HTTP_ACCEPT"),
                environ.get("HTTP_ACCEPT_ENCODING"),
                parse_qs(environ.get("QUERY_STRING", "")),
                False,
            )
        start_response(status, headers)
        return [output]

    return metrics_app


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: a scrape every few seconds is not news."""


class _Server(ThreadingMixIn, WSGIServer):
    # A thread per request that does not hold up the server's shutdown.
    daemon_threads = True


def _start(port: int, addr: str, registry: Collector) -> tuple[WSGIServer, threading.Thread]:
    # The address family of `addr` (an IPv6 address needs AF_INET6).
    infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    server_class = type("_Server", (_Server,), {"address_family": family})
    server: WSGIServer = make_server(
        str(sockaddr[0]), port, _make_wsgi_app(registry), server_class, handler_class=_Quiet
    )
    thread = threading.Thread(target=server.serve_forever, name="serve_metrics", daemon=True)
    thread.start()
    return server, thread


async def serve_metrics(
    port: int = 8000,
    addr: str = "127.0.0.1",
    registry: CollectorRegistry = REGISTRY,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `registry` on ``http://addr:port/metrics`` until cancelled.

    An HTTP server in a thread that the task owns: it stops, and its thread ends, when the
    task is cancelled. It answers as `prometheus_client.start_http_server` does (content
    negotiation, gzip, ``name[]`` filters), formatting through `generate_latest`. Start it
    with ``await tg.start(...)`` to get the bound port (useful with ``port=0``):

        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_metrics, 8000)
            ...
            tg.cancel_scope.cancel()

    Binds to loopback unless told otherwise.
    """
    server, thread = _start(port, addr, registry)
    try:
        task_status.started(server.server_port)
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.shutdown)
            server.server_close()
            await anyio.to_thread.run_sync(thread.join)
