"""MkDocs hook: the site works offline, with its diagrams drawn.

The Material theme loads two scripts from a CDN when a page needs them: Mermaid, to draw
diagrams, and a `ResizeObserver` polyfill for old browsers. This hook serves both with the
site instead. At build time it takes each script from its npm package, at the version
pinned below (`npm pack`, once; the files are kept in `.cache/docs-assets/`, which git
ignores), adds it to the site under `assets/javascripts/`, and points the theme's script
at it. Source maps, which quote the theme's source and its CDN addresses, are left out.

After the build, no page or asset may name a CDN host: the build fails if one does. The
theme's fonts are the reader's own (`font: false` in mkdocs.yml), for the same reason.

Without npm, and with nothing cached, the site is built without the two scripts: it says
so in the build log, and diagrams then show as their Mermaid text.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.offline")

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "docs-assets"
CDN_HOSTS = (
    "unpkg.com",
    "cdn.jsdelivr.net",
    "cdnjs.cloudflare.com",
    "fonts.googleapis.com",
    "fonts.gstatic.com",
)
TEXT_SUFFIXES = {".html", ".js", ".css", ".json", ".xml", ".txt"}


@dataclass(frozen=True)
class Asset:
    package: str
    version: str
    member: str  # path inside the npm tarball
    cdn_url: str  # the address the theme's bundle loads it from
    site_path: str  # where the site serves it

    @property
    def cached(self) -> Path:
        return CACHE / f"{self.package}-{self.version}" / Path(self.member).name


ASSETS = (
    Asset(
        "mermaid",
        "11.12.0",
        "package/dist/mermaid.min.js",
        "https://unpkg.com/mermaid@11/dist/mermaid.min.js",
        "assets/javascripts/mermaid.min.js",
    ),
    Asset(
        "resize-observer-polyfill",
        "1.5.1",
        "package/dist/ResizeObserver.js",
        "https://unpkg.com/resize-observer-polyfill",
        "assets/javascripts/resize-observer-polyfill.js",
    ),
)

_available: list[Asset] = []
_SOURCE_MAP = re.compile(r"^//# sourceMappingURL=\S+[ \t]*$", re.M)


def _fetch(missing: list[Asset]) -> None:
    """Extract each asset from its npm package's tarball into the cache."""
    npm = shutil.which("npm")
    if npm is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{a.package}@{a.version}" for a in missing]
        done = subprocess.run(
            [npm, "pack", *specs, "--pack-destination", tmp, "--silent"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise PluginError(f"`npm pack {' '.join(specs)}` failed:\n{done.stderr.strip()}")
        for asset in missing:
            with tarfile.open(Path(tmp) / f"{asset.package}-{asset.version}.tgz") as tar:
                member = tar.extractfile(asset.member)
                if member is None:
                    raise PluginError(f"{asset.package} {asset.version} has no {asset.member}")
                data = member.read()
            asset.cached.parent.mkdir(parents=True, exist_ok=True)
            # Written aside, then renamed: builds running at once never read half a file.
            partial = asset.cached.with_suffix(f".{os.getpid()}.part")
            partial.write_bytes(data)
            os.replace(partial, asset.cached)


def on_config(config: MkDocsConfig, **kwargs: Any) -> MkDocsConfig:
    missing = [a for a in ASSETS if not a.cached.exists()]
    if missing:
        _fetch(missing)
    _available[:] = [a for a in ASSETS if a.cached.exists()]
    if len(_available) < len(ASSETS):
        log.info(
            "npm not found and %s not cached in %s: diagrams will show as Mermaid text "
            "(install npm to draw them)",
            ", ".join(a.package for a in ASSETS if a not in _available),
            CACHE,
        )
    return config


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    for asset in _available:
        files.append(File.generated(config, asset.site_path, abs_src_path=str(asset.cached)))
    return files


def _point_theme_at_site(bundle: Path) -> None:
    """Make the theme's bundle load each asset from the site, not from the CDN."""
    text = bundle.read_text()
    for asset in ASSETS:
        quoted = f'"{asset.cdn_url}"'
        if quoted not in text:
            raise PluginError(
                f"{bundle.name} no longer loads {asset.package} from {asset.cdn_url}; "
                f"update ASSETS in {Path(__file__).name} for this version of the theme"
            )
        # `__md_scope` is the site's root URL, which the theme sets on every page.
        local = f'new URL("{asset.site_path}",__md_scope).href'
        text = text.replace(quoted, local)
    bundle.write_text(text)


def on_post_build(config: MkDocsConfig, **kwargs: Any) -> None:
    site = Path(config.site_dir)
    for source_map in site.rglob("*.map"):
        source_map.unlink()
    for script in site.rglob("*.js"):
        text = script.read_text()
        if "sourceMappingURL=" in text:
            script.write_text(_SOURCE_MAP.sub("", text))
    bundles = list((site / "assets" / "javascripts").glob("bundle.*.min.js"))
    if not bundles:
        raise PluginError("the theme's bundle.*.min.js is not in the built site")
    for bundle in bundles:
        _point_theme_at_site(bundle)
    found = [
        f"{path.relative_to(site)}: {host}"
        for path in sorted(site.rglob("*"))
        if path.suffix in TEXT_SUFFIXES
        for host in CDN_HOSTS
        if host in path.read_text(errors="replace")
    ]
    if found:
        raise PluginError("the built site still names CDN hosts:\n  " + "\n  ".join(found))
