"""Fetch pinned source archives from a package index, as pip would reach it, without pip.

The embedded mixture is read from two archives on PyPI (the `bigbench` sdist and the
`evals` wheel). Downloading them with `pip download` broke with pip 26.3: pip now
prepares an sdist's metadata before saving it, and the bigbench sdist declares a direct
URL dependency, which pip refuses ("Distributions from PyPI cannot declare direct URL
dependencies"), with or without `--no-deps`. Preparing metadata also runs the sdist's
own packaging code. We only need the bytes, so this module fetches the exact files:

- the index, certificates and proxy are the user's pip configuration (`pip config
  list` of this interpreter, which covers pip.conf files and `PIP_*` variables; the
  `PIP_*` variables alone when pip is missing), so a private mirror, a proxy or a
  corporate CA works as it does for `pip install`;
- the file is found by its exact name on a PEP 503 (HTML) or PEP 691 (JSON) simple
  index page, or in a `find-links` directory, or in archives the user names (offline);
- its SHA-256 is checked against the pin before it is used; a mismatch is deleted.

Nothing here imports more than the standard library (and tqdm if present, through
`hbo_jax.progress`), so the same code runs under any pip and any Python:
`python -m hbo_jax.data.fetch --dest DIR` downloads the archives for copying to an
offline machine.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import json
import logging
import netrc
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable

from hbo_jax.errors import FetchError
from hbo_jax.progress import progress

log = logging.getLogger(__name__)

DEFAULT_INDEX = "https://pypi.org/simple"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """One exact file of a project on a package index, pinned by content."""

    project: str
    filename: str
    sha256: str
    size: int


# The embedded mixture's sources (hbo_jax.data.embedded reads them, `main` downloads them):
# the exact files, pinned by size and SHA-256 as PyPI lists them. They are here, not with
# the recipe, so that this module needs nothing beyond the standard library.
BIGBENCH_SDIST = Archive("bigbench", "bigbench-1.0.0.tar.gz",
                         "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", 358249635)
EVALS_WHEEL = Archive("evals", "evals-3.0.1.post1-py3-none-any.whl",
                      "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78", 46322659)
ARCHIVES = (BIGBENCH_SDIST, EVALS_WHEEL)


@dataclass
class IndexSettings:
    """What pip would use to reach its indexes (the subset that matters for a download)."""

    index_urls: list[str] = field(default_factory=lambda: [DEFAULT_INDEX])
    find_links: list[str] = field(default_factory=list)
    cert: str = ""  # CA bundle; "" = the system's
    client_cert: str = ""  # PEM with key and certificate
    proxy: str = ""  # "" = the environment's http(s)_proxy / no_proxy
    trusted_hosts: list[str] = field(default_factory=list)  # plain HTTP / unverified TLS allowed
    timeout: float = 60.0
    source: str = "defaults"  # where the settings came from, for messages


def _parse_pip_config(text: str) -> dict[str, str]:
    """`pip config list` lines (`section.key='value'`) -> {key: value} by pip's precedence.

    The environment (`:env:`) wins over the `download` section, which wins over `global`:
    the order pip itself applies for `pip download`.
    """
    found: dict[tuple[str, str], str] = {}
    for line in text.splitlines():
        name, sep, raw = line.partition("=")
        if not sep or "." not in name:
            continue
        section, _, key = name.rpartition(".")
        try:
            value = ast.literal_eval(raw.strip())
        except (SyntaxError, ValueError):
            value = raw.strip().strip("'\"")
        found[(section, key)] = str(value)
    out: dict[str, str] = {}
    for section in ("global", "download", ":env:"):  # later sections override earlier ones
        out.update({k: v for (s, k), v in found.items() if s == section})
    return out


def _env_pip_config() -> dict[str, str]:
    """The `PIP_*` variables as pip reads them (PIP_INDEX_URL -> index-url)."""
    return {k[4:].lower().replace("_", "-"): v for k, v in os.environ.items() if k.startswith("PIP_")}


def pip_settings(python: str = sys.executable) -> IndexSettings:
    """The index settings of `python -m pip` (config files and `PIP_*` variables)."""
    try:
        proc = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        ok = proc.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if ok:
        conf, source = _parse_pip_config(proc.stdout), f"pip config of {python}"
    else:  # no pip in this environment (e.g. made by uv): its variables still apply
        conf, source = _env_pip_config(), "PIP_* environment variables (pip not available)"
    return settings_from_pip_config(conf, source)


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def settings_from_pip_config(conf: dict[str, str], source: str = "given") -> IndexSettings:
    """Builds IndexSettings from pip option names (`index-url`, `extra-index-url`, ...)."""
    indexes = [] if _truthy(conf.get("no-index", "0")) else (
        [conf.get("index-url") or DEFAULT_INDEX] + conf.get("extra-index-url", "").split())
    return IndexSettings(
        index_urls=indexes, find_links=conf.get("find-links", "").split(), cert=conf.get("cert", ""),
        client_cert=conf.get("client-cert", ""), proxy=conf.get("proxy", ""),
        trusted_hosts=conf.get("trusted-host", "").split(),
        timeout=float(conf.get("timeout") or conf.get("default-timeout") or 60), source=source)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path, archive: Archive) -> bool:
    return path.is_file() and path.stat().st_size == archive.size and sha256_of(path) == archive.sha256


class _Links(HTMLParser):
    """Anchors of a PEP 503 simple page: (text, href)."""

    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href, self._text = dict(attrs).get("href"), []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append(("".join(self._text).strip(), self._href))
            self._href = None


class _Client:
    """urllib with pip's certificates, client certificate, proxy, trusted hosts and credentials."""

    def __init__(self, s: IndexSettings):
        self.s = s
        ctx = ssl.create_default_context(cafile=s.cert or None)
        if s.client_cert:
            ctx.load_cert_chain(s.client_cert)
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        proxies = {"http": s.proxy, "https": s.proxy} if s.proxy else None  # None: from the environment
        self._openers = {verify: urllib.request.build_opener(
            urllib.request.ProxyHandler(proxies), urllib.request.HTTPSHandler(context=ctx if verify else insecure))
            for verify in (True, False)}
        self._auth: dict[str, str] = {}

    def remember_credentials(self, url: str) -> str:
        """Strips `user:password@` from an index URL and keeps it for that host (pip sends it there)."""
        parts = urllib.parse.urlsplit(url)
        if parts.username is None:
            return url
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        self._auth[parts.hostname or ""] = "Basic " + base64.b64encode(token.encode()).decode()
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def _auth_header(self, host: str) -> str | None:
        if host in self._auth:
            return self._auth[host]
        try:  # requests (and so pip) reads ~/.netrc too
            found = netrc.netrc().authenticators(host)
        except (OSError, netrc.NetrcParseError):
            found = None
        if found and found[0] is not None:
            return "Basic " + base64.b64encode(f"{found[0]}:{found[2] or ''}".encode()).decode()
        return None

    def open(self, url: str, accept: str | None = None):
        host = urllib.parse.urlsplit(url).hostname or ""
        req = urllib.request.Request(url, headers={"User-Agent": "hbo_jax-fetch"})
        if accept:
            req.add_header("Accept", accept)
        if (auth := self._auth_header(host)) is not None:
            req.add_header("Authorization", auth)
        trusted = any(host == t.split(":")[0] for t in self.s.trusted_hosts)
        if url.startswith("http://") and not trusted:
            raise FetchError(f"{url}: plain HTTP index; pip refuses it too unless the host is a trusted-host")
        return self._openers[not trusted].open(req, timeout=self.s.timeout)


def _file_url_path(url: str) -> Path:
    return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))


def _normalize(project: str) -> str:
    """PEP 503 project name normalisation."""
    out = project.lower()
    for ch in "_.":
        out = out.replace(ch, "-")
    return out


def candidate_urls(client: _Client, index_url: str, archive: Archive) -> list[tuple[str, str | None]]:
    """(url, sha256 the index states or None) of `archive.filename` on one simple index."""
    page = client.remember_credentials(index_url).rstrip("/") + f"/{_normalize(archive.project)}/"
    if page.startswith("file:"):  # a local index: pip reads the directory's index.html
        path = _file_url_path(page)
        body, ctype = ((path / "index.html").read_bytes(), "text/html") if path.is_dir() else (b"", "")
    else:
        with client.open(page, accept="application/vnd.pypi.simple.v1+json, text/html;q=0.1") as resp:
            body, ctype = resp.read(), resp.headers.get("Content-Type", "")
    out = []
    if "json" in ctype:  # PEP 691
        for f in json.loads(body).get("files", []):
            if f.get("filename") == archive.filename:
                out.append((urllib.parse.urljoin(page, f["url"]), f.get("hashes", {}).get("sha256")))
        return out
    parser = _Links()
    parser.feed(body.decode("utf-8", "replace"))
    for text, href in parser.links:
        url, _, frag = urllib.parse.urljoin(page, href).partition("#")
        if text == archive.filename or url.rsplit("/", 1)[-1] == archive.filename:
            algo, _, digest = frag.partition("=")
            out.append((url, digest if algo == "sha256" else None))
    return out


def _download(client: _Client, url: str, archive: Archive, dest: Path, attempts: int = 3) -> None:
    """Streams `url` to `dest`, checking size and SHA-256 before the file takes its name."""
    part = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    for attempt in range(1, attempts + 1):
        h, got = hashlib.sha256(), 0
        bar = None
        try:
            with client.open(url) as resp, open(part, "wb") as out:
                bar = progress(desc=archive.filename, total=archive.size, unit="B", unit_scale=True, leave=True)
                while block := resp.read(_CHUNK):
                    out.write(block)
                    h.update(block)
                    got += len(block)
                    bar.update(len(block))
            break
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            part.unlink(missing_ok=True)
            if isinstance(e, urllib.error.HTTPError) and e.code in (401, 403, 404):
                raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
            if attempt == attempts:
                raise FetchError(f"{url}: download failed after {attempts} attempts: {e}") from None
            log.warning("%s: %s; retrying (%d of %d)", url, e, attempt + 1, attempts)
            time.sleep(2 * attempt)
        finally:
            if bar is not None:
                bar.close()
    if got != archive.size or h.hexdigest() != archive.sha256:
        part.unlink(missing_ok=True)
        raise FetchError(f"{url}: got {got} bytes with SHA-256 {h.hexdigest()}, expected {archive.size} bytes "
                         f"with SHA-256 {archive.sha256}; the file was deleted (a mirror serving other bytes "
                         "under this name?)")
    os.replace(part, dest)


def _local_candidates(archive: Archive, paths: Iterable[str | os.PathLike]) -> list[Path]:
    out = []
    for p in paths:
        p = _file_url_path(str(p)) if str(p).startswith("file:") else Path(p).expanduser()
        if p.is_dir():
            p = p / archive.filename
        if p.name == archive.filename and p.is_file():
            out.append(p)
    return out


def fetch(archive: Archive, dest_dir: Path, settings: IndexSettings | None = None,
          local: Iterable[str | os.PathLike] = ()) -> Path:
    """Returns `dest_dir/<filename>` holding the pinned archive, verified, fetching it if needed.

    Looks, in order, at: the file already in `dest_dir`, the `local` paths (files or
    directories; for machines without network), pip's `find-links` directories, then
    each index (`index-url`, then `extra-index-url`). Every candidate is checked against
    the pinned size and SHA-256 before it is used.

    Raises:
        FetchError: no source had the file with the pinned content; says what was tried.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / archive.filename
    if _verified(dest, archive):
        return dest
    tried: list[str] = []
    if dest.exists():
        tried.append(f"{dest}: SHA-256 does not match the pin; replaced")
        dest.unlink()
    local = list(local)
    for path in _local_candidates(archive, local):
        if _verified(path, archive):
            log.info("using %s (SHA-256 verified)", path)
            shutil.copyfile(path, dest)
            return dest
        tried.append(f"{path}: SHA-256 does not match the pin")
    if local and not any(_local_candidates(archive, local)):
        tried.append(f"named archives {[str(p) for p in local]}: no {archive.filename}")
    settings = settings or pip_settings()
    for path in _local_candidates(archive, [f for f in settings.find_links if "://" not in f or
                                            f.startswith("file:")]):
        if _verified(path, archive):
            log.info("using %s from pip's find-links (SHA-256 verified)", path)
            shutil.copyfile(path, dest)
            return dest
        tried.append(f"{path} (find-links): SHA-256 does not match the pin")
    client = _Client(settings)
    for index in settings.index_urls:
        shown = _Client(IndexSettings()).remember_credentials(index)  # never print a password
        try:
            urls = candidate_urls(client, index, archive)
        except (urllib.error.URLError, OSError, ValueError, TimeoutError) as e:
            tried.append(f"{shown}: {e}")
            continue
        if not urls:
            tried.append(f"{shown}: no {archive.filename} listed")
        for url, stated in urls:
            if stated is not None and stated != archive.sha256:
                tried.append(f"{url}: the index states SHA-256 {stated}, not the pinned {archive.sha256}")
                continue
            log.info("downloading %s (%.0f MB) from %s", archive.filename, archive.size / 1e6, shown)
            try:
                _download(client, url, archive, dest)
                return dest
            except FetchError as e:
                tried.append(str(e))
    raise FetchError(
        f"could not get {archive.filename} (SHA-256 {archive.sha256}); index settings from {settings.source}. "
        "Tried:\n  " + "\n  ".join(tried or ["no index configured (pip's no-index is set)"]) +
        "\nOn a machine without access to a package index, download it elsewhere (`python -m "
        "hbo_jax.data.fetch --dest DIR`) and name it with data.embedded_archives=[DIR], or set "
        "data.source_dir to your own data.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hbo_jax.data.fetch",
                                     description="Download and verify the embedded mixture's source archives.")
    parser.add_argument("--dest", default=".", help="directory to put the archives in (default: .)")
    parser.add_argument("--from", dest="local", nargs="*", default=[],
                        help="archives (files or directories) to take instead of downloading")
    parser.add_argument("--show-settings", action="store_true", help="print the index settings pip gives")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = pip_settings()
    if args.show_settings:
        print(json.dumps(settings.__dict__, indent=2))
    try:
        for a in ARCHIVES:
            path = fetch(a, Path(args.dest), settings, args.local)
            print(f"{path}  sha256={a.sha256}")
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
