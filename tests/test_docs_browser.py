"""The built documentation draws its diagrams in a real browser, with no network.

The docs are built once (``mkdocs build``, which takes Mermaid from its npm package: see
docs/offline_hooks.py), served on loopback, and loaded in headless Chromium, whose host
resolver knows no host but 127.0.0.1. Material draws each diagram into a closed shadow
root, which ``--dump-dom`` does not show, so the test reads the page through the DevTools
protocol (over ``--remote-debugging-pipe``), which does.

Without chromium or npm these tests skip, unless the environment variable CI is set (CI
installs both: see .ci/run), where a missing one is a failure.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
NPM = shutil.which("npm")
CDN_HOSTS = ("unpkg.com", "cdn.jsdelivr.net", "cdnjs.cloudflare.com", "fonts.googleapis.com")

missing = [name for name, path in (("chromium", CHROMIUM), ("npm", NPM)) if path is None]
pytestmark = pytest.mark.skipif(
    bool(missing) and not IN_CI,
    reason=f"{' and '.join(missing)} not found on PATH (Debian: apt-get install chromium npm); "
    "with CI=true this fails instead",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if missing:
        pytest.fail(f"CI is set but {' and '.join(missing)} is not on PATH")
    site = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    return site


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class Browser:
    """Headless Chromium, driven through the DevTools protocol over a pair of pipes."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        to_chrome, self._commands = os.pipe()
        self._replies, from_chrome = os.pipe()

        def pipes_on_3_and_4() -> None:
            # dup first: a pipe that already is fd 3 or 4 would keep its close-on-exec flag.
            read, write = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(read, 3)
            os.dup2(write, 4)

        self._process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                # No network but loopback: a script from anywhere else fails to load.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=pipes_on_3_and_4,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer = b""
        self._last_id = 0

    def send(self, method: str, params: dict[str, Any] | None = None, session: str = "") -> Any:
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._replies], [], [], 30)
                if not ready:
                    raise TimeoutError(f"chromium did not answer {method}")
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise EOFError(f"chromium exited before answering {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> str:
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        return str(
            self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        )

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self._process.wait(timeout=10)
        except (OSError, EOFError, TimeoutError, RuntimeError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        finally:
            os.close(self._commands)
            os.close(self._replies)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    browser = Browser(tmp_path / "profile")
    try:
        yield browser
    finally:
        browser.close()


def nodes(node: dict[str, Any], in_shadow: bool = False) -> Iterator[tuple[dict[str, Any], bool]]:
    """Every node of a DOM.getDocument tree, shadow roots included, and whether it is in one."""
    yield node, in_shadow
    for child in node.get("children", ()):
        yield from nodes(child, in_shadow)
    for root in node.get("shadowRoots", ()):
        yield from nodes(root, True)


def diagrams(document: dict[str, Any]) -> tuple[int, int, int]:
    """(diagram boxes, boxes holding an svg, boxes still showing their Mermaid source)."""
    boxes = [
        node
        for node, _ in nodes(document)
        if "mermaid" in dict(zip(*[iter(node.get("attributes", ()))] * 2)).get("class", "").split()
    ]
    drawn = sum(any(node.get("nodeName") == "svg" for node, _ in nodes(box)) for box in boxes)
    source = sum(
        any(
            "stateDiagram-v2" in (node.get("nodeValue") or "")
            for node, in_shadow in nodes(box)
            if not in_shadow
        )
        for box in boxes
    )
    return len(boxes), drawn, source


def test_site_names_no_cdn_and_serves_mermaid(site: Path) -> None:
    assert (site / "assets" / "javascripts" / "mermaid.min.js").stat().st_size > 1_000_000
    named = [
        f"{path.relative_to(site)}: {host}"
        for path in site.rglob("*")
        if path.suffix in {".html", ".js", ".css"}
        for host in CDN_HOSTS
        if host in path.read_text(errors="replace")
    ]
    assert named == []


def test_diagrams_are_drawn_offline(served: str, site: Path, browser: Browser) -> None:
    page = "diagrams/"  # eight diagrams
    expected = (site / page / "index.html").read_text().count('class="mermaid"')
    assert expected > 0, f"{page} has no diagram to draw"
    session = browser.open(f"{served}/{page}")
    deadline = time.monotonic() + 30
    while True:
        document = browser.send("DOM.getDocument", {"depth": -1, "pierce": True}, session)
        seen = diagrams(document["root"])
        if seen == (expected, expected, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    boxes, drawn, source = seen
    assert (boxes, drawn) == (expected, expected), f"{drawn} of {expected} diagrams drawn"
    assert source == 0, f"{source} diagrams still show their Mermaid source text"
