"""Fetching pinned archives from a package index without pip (hbo_jax.data.fetch).

Indexes here are local: a PEP 503 `file://` index laid out in tmp_path, and a PEP 691
JSON index served over HTTP on the loopback address. The archives are small made-up
files pinned by their own SHA-256.
"""

import base64
import hashlib
import http.server
import json
import sys
import threading
from pathlib import Path

import pytest

from hbo_jax.data.fetch import (Archive, FetchError, IndexSettings, _parse_pip_config, fetch, pip_settings,
                                settings_from_pip_config)

PAYLOAD = b"not really a tarball, but pinned all the same\n" * 100


def _archive(payload: bytes = PAYLOAD, name: str = "demo_pkg-1.0.tar.gz") -> Archive:
    return Archive("Demo_Pkg", name, hashlib.sha256(payload).hexdigest(), len(payload))


def _file_index(root: Path, payload: bytes, stated_sha: str | None) -> str:
    """A PEP 503 index in `root/simple` whose file lives in `root/files`; returns its URL."""
    (root / "files").mkdir(parents=True)
    (root / "files" / "demo_pkg-1.0.tar.gz").write_bytes(payload)
    page = root / "simple" / "demo-pkg"  # the normalised project name
    page.mkdir(parents=True)
    frag = f"#sha256={stated_sha}" if stated_sha else ""
    page.joinpath("index.html").write_text(
        f'<html><body><a href="../../files/demo_pkg-1.0.tar.gz{frag}">demo_pkg-1.0.tar.gz</a></body></html>')
    return (root / "simple").as_uri()


def test_file_index_download_is_verified_and_named(tmp_path):
    a = _archive()
    index = _file_index(tmp_path / "idx", PAYLOAD, a.sha256)
    got = fetch(a, tmp_path / "dest", IndexSettings(index_urls=[index]))
    assert got == tmp_path / "dest" / a.filename and got.read_bytes() == PAYLOAD


def test_index_stating_another_hash_is_not_downloaded(tmp_path):
    a = _archive()
    index = _file_index(tmp_path / "idx", PAYLOAD, "0" * 64)
    with pytest.raises(FetchError, match="states SHA-256 0000"):
        fetch(a, tmp_path / "dest", IndexSettings(index_urls=[index]))
    assert not any((tmp_path / "dest").iterdir())


def test_bytes_that_do_not_match_the_pin_are_deleted(tmp_path):
    a = _archive()
    index = _file_index(tmp_path / "idx", PAYLOAD + b"tampered", None)  # no stated hash: caught on arrival
    with pytest.raises(FetchError, match="the file was deleted"):
        fetch(a, tmp_path / "dest", IndexSettings(index_urls=[index]))
    assert not any((tmp_path / "dest").iterdir())  # neither the file nor a partial download


def test_later_index_is_tried_when_the_first_lacks_the_file(tmp_path):
    a = _archive()
    empty = tmp_path / "empty" / "simple"
    empty.mkdir(parents=True)
    index = _file_index(tmp_path / "idx", PAYLOAD, a.sha256)
    got = fetch(a, tmp_path / "dest", IndexSettings(index_urls=[empty.as_uri(), index]))
    assert got.read_bytes() == PAYLOAD


def test_named_local_archive_needs_no_index(tmp_path):
    a = _archive()
    offline = tmp_path / "usb"
    offline.mkdir()
    (offline / a.filename).write_bytes(PAYLOAD)
    got = fetch(a, tmp_path / "dest", IndexSettings(index_urls=[]), local=[offline])
    assert got.read_bytes() == PAYLOAD


def test_named_local_archive_with_other_bytes_is_refused(tmp_path):
    a = _archive()
    (tmp_path / a.filename).write_bytes(b"something else")
    with pytest.raises(FetchError, match="does not match the pin"):
        fetch(a, tmp_path / "dest", IndexSettings(index_urls=[]), local=[tmp_path / a.filename])


def test_cached_archive_with_other_bytes_is_replaced(tmp_path):
    a = _archive()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / a.filename).write_bytes(b"truncated")
    index = _file_index(tmp_path / "idx", PAYLOAD, a.sha256)
    assert fetch(a, dest, IndexSettings(index_urls=[index])).read_bytes() == PAYLOAD


def test_pip_config_precedence_env_over_download_over_global():
    text = "\n".join([
        "global.index-url='https://global.example/simple'",
        "global.cert='/global/ca.pem'",
        "download.index-url='https://download.example/simple'",
        ":env:.index-url='https://env.example/simple'",
        "global.extra-index-url='file:///a/simple file:///b/simple'",
    ])
    conf = _parse_pip_config(text)
    assert conf["index-url"] == "https://env.example/simple" and conf["cert"] == "/global/ca.pem"
    s = settings_from_pip_config(conf)
    assert s.index_urls == ["https://env.example/simple", "file:///a/simple", "file:///b/simple"]


def test_no_index_leaves_only_local_sources():
    assert settings_from_pip_config({"no-index": "true", "index-url": "https://x.example/simple"}).index_urls == []


def test_settings_come_from_the_real_pip_config(tmp_path, monkeypatch):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nextra-index-url = file:///mirror/simple\ntrusted-host = mirror.example\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_INDEX_URL", "https://corp.example/pypi/simple")
    monkeypatch.setenv("PIP_PROXY", "http://proxy.example:3128")
    s = pip_settings(sys.executable)
    assert s.index_urls[0] == "https://corp.example/pypi/simple"
    assert "file:///mirror/simple" in s.index_urls
    assert s.proxy == "http://proxy.example:3128" and s.trusted_hosts == ["mirror.example"]
    assert s.source.startswith("pip config")


class _JsonIndex(http.server.BaseHTTPRequestHandler):
    """PEP 691 JSON project page + the file, behind basic auth (user `u`, password `p w`)."""

    payload = PAYLOAD
    seen_auth: list = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).seen_auth.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != "Basic " + base64.b64encode(b"u:p w").decode():
            self.send_response(401)
            self.end_headers()
            return
        if self.path == "/simple/demo-pkg/":
            digest = hashlib.sha256(self.payload).hexdigest()
            body = json.dumps({"meta": {"api-version": "1.0"}, "name": "demo-pkg", "files": [
                {"filename": "demo_pkg-1.0.tar.gz", "url": "/files/demo_pkg-1.0.tar.gz",
                 "hashes": {"sha256": digest}}]}).encode()
            ctype = "application/vnd.pypi.simple.v1+json"
        elif self.path == "/files/demo_pkg-1.0.tar.gz":
            body, ctype = self.payload, "application/octet-stream"
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def json_index(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY"):  # loopback only
        monkeypatch.delenv(var, raising=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JsonIndex)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _JsonIndex.seen_auth = []
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()


def test_json_index_over_http_with_credentials_and_trusted_host(tmp_path, json_index):
    a = _archive()
    s = IndexSettings(index_urls=[f"http://u:p%20w@{json_index}/simple"], trusted_hosts=["127.0.0.1"])
    got = fetch(a, tmp_path / "dest", s)
    assert got.read_bytes() == PAYLOAD
    assert all(h is not None for h in _JsonIndex.seen_auth)  # credentials sent to the index's host


def test_plain_http_index_without_trusted_host_is_refused(tmp_path, json_index):
    with pytest.raises(FetchError, match="plain HTTP"):
        fetch(_archive(), tmp_path / "dest", IndexSettings(index_urls=[f"http://u:p%20w@{json_index}/simple"]))
    assert _JsonIndex.seen_auth == []  # nothing was sent


def test_password_is_not_shown_in_errors(tmp_path, json_index):
    s = IndexSettings(index_urls=[f"http://u:secret@{json_index}/simple"], trusted_hosts=["127.0.0.1"])
    with pytest.raises(FetchError) as err:
        fetch(_archive(), tmp_path / "dest", s)
    assert "secret" not in str(err.value) and "401" in str(err.value)
