"""Helpers for tests against the real Prometheus tools: `promtool` and a `prometheus` server.

Everything is generic over a `prometheus_client` registry (or any collector a registry
holds), so the same helpers serve plain metrics and machine metrics alike. Network traffic
stays on the loopback interface.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

__all__ = [
    "IN_CI",
    "PrometheusServer",
    "PromtoolResult",
    "cardinalities",
    "check_metrics",
    "check_rules",
    "find_prometheus",
    "find_promtool",
    "free_port",
    "run_prometheus",
    "serve_registry",
    "unit_test_rules",
]

LOOPBACK = "127.0.0.1"
INSTALL_HINT = "Debian/Ubuntu: apt-get install prometheus"
#: Whether the environment variable CI is set: there a missing binary is a failure.
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

# A direct opener: a proxy from the environment (http_proxy) must not see loopback traffic.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def find_promtool() -> str | None:
    """The path of `promtool` on PATH, or None."""
    return shutil.which("promtool")


def find_prometheus() -> str | None:
    """The path of the `prometheus` server on PATH, or None."""
    return shutil.which("prometheus")


# ---------------------------------------------------------------------------------------------
# promtool


@dataclass(frozen=True)
class PromtoolResult:
    """The outcome of one `promtool check metrics` run."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def problems(self) -> list[str]:
        """What promtool objected to: its output lines, or the exit code if it said nothing.

        Empty exactly when promtool exited 0 and printed nothing (a plain check of a clean
        exposition prints nothing; lint problems go to stderr with exit code 3, parse errors
        with exit code 1).
        """
        lines = [line for line in (self.stdout + self.stderr).splitlines() if line.strip()]
        if self.returncode != 0 and not lines:
            lines.append(f"promtool exited with code {self.returncode} and printed nothing")
        return lines


def check_metrics(
    exposition: bytes,
    *,
    promtool: str | None = None,
    extended: bool = False,
    timeout: float = 30.0,
) -> PromtoolResult:
    """Run `promtool check metrics` (reading stdin) on a text exposition.

    `exposition` is what `prometheus_client.generate_latest` returns. With `extended`, a
    clean check prints a cardinality table instead of nothing (see `cardinalities`).
    """
    binary = promtool or find_promtool()
    if binary is None:
        raise FileNotFoundError(f"promtool not found on PATH ({INSTALL_HINT})")
    args = [binary, "check", "metrics"]
    if extended:
        args.append("--extended")
    done = subprocess.run(args, input=exposition, capture_output=True, timeout=timeout)
    return PromtoolResult(
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )


def cardinalities(exposition: bytes, *, promtool: str | None = None) -> dict[str, int]:
    """Series per metric family as promtool counts them (`check metrics --extended`).

    This shows that promtool actually parsed each family: a plain check of an empty input
    is as silent as a check of a clean one.

    Raises:
        AssertionError: if promtool reports problems or its table cannot be read.
    """
    result = check_metrics(exposition, promtool=promtool, extended=True)
    assert result.returncode == 0, result.problems
    assert not result.stderr.strip(), result.problems
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    # Header "Metric Cardinality Percentage", one row per family, then a "Total" row.
    assert rows, "promtool --extended printed no table"
    assert rows[0][:2] == ["Metric", "Cardinality"], result.stdout
    table = {row[0]: int(row[1]) for row in rows[1:] if row[0] != "Total"}
    total = [int(row[1]) for row in rows[1:] if row[0] == "Total"]
    assert total == [sum(table.values())], result.stdout
    return table


def _promtool(
    args: list[str], directory: Path, promtool: str | None, timeout: float
) -> PromtoolResult:
    binary = promtool or find_promtool()
    if binary is None:
        raise FileNotFoundError(f"promtool not found on PATH ({INSTALL_HINT})")
    done = subprocess.run(
        [binary, *args], cwd=directory, capture_output=True, timeout=timeout, check=False
    )
    return PromtoolResult(
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )


def check_rules(
    rules: str, *, promtool: str | None = None, timeout: float = 30.0
) -> PromtoolResult:
    """Run `promtool check rules` on the text of a rule file."""
    with tempfile.TemporaryDirectory(prefix="sm-promtool-") as tmp:
        (Path(tmp) / "rules.yml").write_text(rules)
        return _promtool(["check", "rules", "rules.yml"], Path(tmp), promtool, timeout)


def unit_test_rules(
    rules: str, tests: str, *, promtool: str | None = None, timeout: float = 60.0
) -> PromtoolResult:
    """Run `promtool test rules` on unit tests (YAML) of a rule file given as text.

    The tests' ``rule_files`` must name ``rules.yml``, where `rules` is written.
    """
    with tempfile.TemporaryDirectory(prefix="sm-promtool-") as tmp:
        (Path(tmp) / "rules.yml").write_text(rules)
        (Path(tmp) / "tests.yml").write_text(tests)
        return _promtool(["test", "rules", "tests.yml"], Path(tmp), promtool, timeout)


# ---------------------------------------------------------------------------------------------
# Serving a registry


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_registry(registry: CollectorRegistry) -> Iterator[str]:
    """Serve `registry` on a free loopback port; yield its address ``127.0.0.1:PORT``.

    Uses `prometheus_client.start_http_server`; the server is shut down on exit.
    """
    # Port 0: the kernel picks the port, so there is no window for another process to take it.
    server, thread = start_http_server(0, addr=LOOPBACK, registry=registry)
    try:
        yield f"{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# A Prometheus server


def _config(target: str, job: str, rule_files: list[str]) -> str:
    # scrape_timeout must not exceed scrape_interval, so set both explicitly.
    rules = "".join(f"  - {json.dumps(path)}\n" for path in rule_files)
    return (
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        + (f"rule_files:\n{rules}" if rules else "")
        + "scrape_configs:\n"
        f"  - job_name: {json.dumps(job)}\n"
        "    static_configs:\n"
        f"      - targets: [{json.dumps(target)}]\n"
    )


def _check_loopback(address: str) -> None:
    host = address.rsplit(":", 1)[0]
    if host not in (LOOPBACK, "localhost", "[::1]"):
        raise ValueError(f"not a loopback address: {address}")


def _get_json(url: str, timeout: float) -> Any:
    _check_loopback(urllib.parse.urlsplit(url).netloc)
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        # A bad query (400, 422) has an error body worth showing; polling will not help.
        if exc.code not in (400, 422):
            raise
        with exc:
            return json.load(exc)


@dataclass
class PrometheusServer:
    """A running Prometheus server started by `run_prometheus`."""

    url: str
    """Base URL, ``http://127.0.0.1:PORT``."""
    target: str
    job: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def query(self, promql: str, *, timeout: float = 5.0) -> list[dict[str, Any]]:
        """One instant query through /api/v1/query; the result vector.

        Each element is ``{"metric": {label: value}, "value": [timestamp, "value"]}``.
        """
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        body = _get_json(url, timeout)
        if body.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed: {body}")
        data = body["data"]
        if data["resultType"] != "vector":
            raise AssertionError(f"query {promql!r} is not an instant vector: {data}")
        return list(data["result"])

    def alerts(self, *, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The alerts through /api/v1/alerts: pending and firing, with labels, state,
        annotations and value."""
        body = _get_json(f"{self.url}/api/v1/alerts", timeout)
        if body.get("status") != "success":
            raise AssertionError(f"/api/v1/alerts failed: {body}")
        return list(body["data"]["alerts"])

    def rule_health(self, *, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every loaded rule through /api/v1/rules: name, health and last error."""
        body = _get_json(f"{self.url}/api/v1/rules", timeout)
        return [
            {k: rule.get(k) for k in ("name", "health", "lastError")}
            for group in body["data"]["groups"]
            for rule in group["rules"]
        ]

    def targets(self, *, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The active scrape targets with their health and last error."""
        body = _get_json(f"{self.url}/api/v1/targets", timeout)
        return list(body["data"]["activeTargets"])

    def wait_for(
        self,
        promql: str,
        *,
        until: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Poll `promql` until `until(result)` holds (by default: a non-empty result).

        Raises:
            TimeoutError: when `timeout` seconds pass first; the message has the last
                result, the scrape targets' health and the server's log.
        """
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._raise_if_exited()
            try:
                result = self.query(promql, timeout=min(5.0, remaining))
            except OSError:  # The server may be between states; try again.
                result = []
            else:
                if until(result):
                    return result
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        try:
            targets: object = [
                {k: t.get(k) for k in ("scrapeUrl", "health", "lastError")} for t in self.targets()
            ]
        except OSError as exc:
            targets = f"(unavailable: {exc})"
        raise TimeoutError(
            f"query {promql!r} not satisfied within {timeout:.1f}s; last result: {result}; "
            f"targets: {targets}\nprometheus log:\n{self.log_tail()}"
        )

    def _raise_if_exited(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"prometheus exited with code {code}:\n{self.log_tail()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a server: SIGTERM, then SIGKILL; bounded in time, always reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(timeout=5)


def _wait_ready(server: PrometheusServer, deadline: float) -> bool:
    """Wait for /-/ready; False if the server exited (e.g. its port was taken)."""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            with _OPENER.open(f"{server.url}/-/ready", timeout=1.0) as response:
                if response.status == 200:
                    return True
        except OSError:  # Not listening yet, or 503 while starting.
            pass
        time.sleep(0.05)
    raise TimeoutError(f"prometheus not ready in time:\n{server.log_tail()}")


@contextmanager
def run_prometheus(
    target: str,
    *,
    job: str = "statemachine_metrics",
    prometheus: str | None = None,
    startup_timeout: float = 20.0,
    rules: str | None = None,
) -> Iterator[PrometheusServer]:
    """Run a Prometheus server on a free loopback port, scraping `target` every second.

    `target` is ``127.0.0.1:PORT`` (see `serve_registry`). `rules` is the text of a rule
    file to load, evaluated every second. Config, TSDB and log live in a temporary
    directory removed on exit; the server is stopped (and killed if need be) on exit,
    including when the body raises.
    """
    _check_loopback(target)
    binary = prometheus or find_prometheus()
    if binary is None:
        raise FileNotFoundError(f"prometheus not found on PATH ({INSTALL_HINT})")
    # Proxy settings must not reach the server: all its traffic is on loopback.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    deadline = time.monotonic() + startup_timeout
    with tempfile.TemporaryDirectory(prefix="sm-prometheus-") as tmp:
        directory = Path(tmp)
        config = directory / "prometheus.yml"
        rule_files = []
        if rules is not None:
            (directory / "rules.yml").write_text(rules)
            rule_files.append(str(directory / "rules.yml"))
        config.write_text(_config(target, job, rule_files))
        # The port is picked before the server binds it; if another process takes it in
        # between, the server exits at once and the next attempt uses another port.
        for attempt in range(3):
            port = free_port()
            log_path = directory / f"prometheus-{attempt}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={directory / f'data-{attempt}'}",
                        f"--web.listen-address={LOOPBACK}:{port}",
                        "--log.level=warn",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            server = PrometheusServer(f"http://{LOOPBACK}:{port}", target, job, process, log_path)
            try:
                if _wait_ready(server, deadline):
                    break
            except BaseException:
                _stop(process)
                raise
            _stop(process)
            if "address already in use" not in server.log_tail(50):
                server._raise_if_exited()
        else:
            raise RuntimeError(f"prometheus could not bind a free port:\n{server.log_tail()}")
        try:
            yield server
        finally:
            _stop(process)
