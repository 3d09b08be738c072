"""An ASGI app that runs each request through a machine and serves `/metrics`.

`/metrics` is `statemachine_metrics.make_asgi_app()` (prometheus_client's, with machine
families formatted by the library), mounted by a few lines of plain ASGI:
no web framework involved, and the same app object works under any ASGI server. Every
other request is a short-lived `Request` machine, `received` -> `handling` -> `done` or
`failed`. With many machines alive at once, read `myapp_request_state_machines` (requests
in flight, per state) and `myapp_request_state_transitions_total` (requests served, per
outcome): the `Enum` of a class without labels only shows the last state written.

    pip install uvicorn
    python examples/asgi_app.py           # or: uvicorn examples.asgi_app:app
    curl http://127.0.0.1:8000/           # hello
    curl http://127.0.0.1:8000/fail       # a 500, counted as failed
    curl http://127.0.0.1:8000/metrics
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from statemachine_metrics import MeteredMachine, Trigger, make_asgi_app

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Request(MeteredMachine, namespace="myapp"):
    """State of the HTTP requests being served"""

    states = ["received", "handling", "done", "failed"]
    handle = Trigger("received", "handling")
    finish = Trigger("handling", "done")
    fail = Trigger("handling", "failed")


metrics_app = make_asgi_app()  # serves prometheus_client's default REGISTRY


async def respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def handle(scope: Scope) -> tuple[int, bytes]:
    """The application itself: a greeting, and a page that always breaks."""
    if scope["path"] == "/":
        return 200, b"hello\n"
    if scope["path"] == "/fail":
        raise RuntimeError("this page always fails")
    return 404, b"not found\n"


async def http(scope: Scope, receive: Receive, send: Send) -> None:
    async with Request() as request:  # the machine ends with the request
        await request.handle()
        try:
            status, body = await handle(scope)
        except Exception:
            await request.fail()
            await respond(send, 500, b"internal error\n")
        else:
            await respond(send, status, body)
            await request.finish()


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI application: `/metrics` for Prometheus, everything else for the app."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http" and scope["path"] == "/metrics":
        await metrics_app(scope, receive, send)
    elif scope["type"] == "http":
        await http(scope, receive, send)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        parser.exit(1, "this example needs an ASGI server to run: pip install uvicorn\n")
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
