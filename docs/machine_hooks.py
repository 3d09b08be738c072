"""MkDocs hook: diagrams and command output generated from the code at build time.

Three fenced blocks are replaced before a page is rendered:

    ```machine-diagram
    examples.worker_pool:PoolWorker
    ```

becomes a Mermaid diagram of that class (`PoolWorker.mermaid()`), and

    ```statemachine-metrics
    list examples.worker_pool
    ```

becomes a console block showing ``python -m statemachine_metrics list examples.worker_pool``
and what it prints. A block ```` ```machine-rules ```` or ```` ```machine-dashboard ````
holding the arguments of ``rules`` or ``dashboard`` (``examples.demo``) becomes what that
command prints, as a YAML or JSON block; a dashboard, being long, is folded under a
``??? example`` summary that names the command. And

    ```public-api
    MeteredMachine
    MachineCollector
    ```

becomes a mkdocstrings reference (``::: statemachine_metrics.MeteredMachine``) for each
listed name, in that order, then for every other name of `statemachine_metrics.__all__`
defined by the package itself, so that a new public name is documented without being
listed. They run the real code, so the pages cannot drift from it; a block that fails
(including a listed name that is not public) stops the build.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from prometheus_client import REGISTRY

import statemachine_metrics
from statemachine_metrics.__main__ import main as cli

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(
    r"^```(machine-diagram|machine-rules|machine-dashboard|statemachine-metrics|public-api)\n"
    r"(.*?)^```$",
    re.M | re.S,
)


def _run(argv: list[str], where: str) -> str:
    """What the command line prints for `argv`; a PluginError if it fails."""
    # Examples are imported as `examples.<name>`, from the project's root.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    out, err = io.StringIO(), io.StringIO()
    before = set(REGISTRY._collector_to_names)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli(argv)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        finally:
            # Examples are separate programs and may reuse metric names: what one
            # registered in the default registry must not stop the next from importing.
            for collector in set(REGISTRY._collector_to_names) - before:
                REGISTRY.unregister(collector)
    if status != 0:
        raise PluginError(f"{where}: `{shlex.join(argv)}` failed: {err.getvalue().strip()}")
    return out.getvalue().rstrip("\n")


def _public_api(listed: list[str], where: str) -> str:
    package = statemachine_metrics
    own = [
        name
        for name in package.__all__
        if getattr(getattr(package, name), "__module__", "").startswith(package.__name__)
    ]
    unknown = [name for name in listed if name not in own]
    if unknown:
        raise PluginError(
            f"{where}: public-api lists {', '.join(unknown)}, which statemachine_metrics "
            f"does not define and export; it exports {', '.join(own)}"
        )
    names = listed + [name for name in own if name not in listed]
    return "\n\n".join(f"::: {package.__name__}.{name}" for name in names)


def _replace(match: re.Match[str], where: str) -> str:
    kind, body = match[1], match[2].strip()
    if kind == "public-api":
        return _public_api(body.split(), where)
    if kind == "machine-diagram":
        return f"```mermaid\n{_run(['diagram', body], where)}\n```"
    if kind == "machine-rules":
        return f"```yaml\n{_run(['rules', *shlex.split(body)], where)}\n```"
    if kind == "machine-dashboard":
        argv = ["dashboard", *shlex.split(body)]
        folded = textwrap.indent(f"```json\n{_run(argv, where)}\n```", "    ")
        return f'??? example "python -m statemachine_metrics {shlex.join(argv)}"\n\n{folded}'
    argv = shlex.split(body)
    output = _run(argv, where)
    return f"```console\n$ python -m statemachine_metrics {shlex.join(argv)}\n{output}\n```"


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    where = page.file.src_uri
    return _BLOCK.sub(lambda match: _replace(match, where), markdown)
