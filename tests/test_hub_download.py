"""Checkpoint manifest and download, against a scripted HTTP server on 127.0.0.1 (no other network).

Each test scripts, per URL path, what the server answers to successive requests (a status, a full
body, a body cut in the middle, a wrong Content-Length, a slow body) and counts the requests, so
that "a cache hit never touches the network" and "404 is not retried" are asserted, not assumed.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib
import multiprocessing
import os
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.request import pathname2url

import pytest
import yaml

from kdzoo.hub.manifest import (
    FileEntry,
    ManifestEntry,
    ManifestError,
    default_manifest_path,
    find,
    read_manifest,
)

dl = importlib.import_module("kdzoo.hub.fetch")

NAME = "resnet8x4.kd_test"
MODEL = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(8192))  # 256 KiB
CONFIG = b'{"architecture": "resnet8x4", "num_classes": 10}\n'
FILES = {"model.safetensors": MODEL, "config.json": CONFIG}


def _spec(body: bytes) -> dict:
    return {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}


def _entry_dict(urls: list[str], name: str = NAME, **extra) -> dict:
    entry = {
        "name": name,
        "urls": urls,
        "files": {file_name: _spec(body) for file_name, body in FILES.items()},
        "architecture": name.split(".")[0],
        "num_classes": 10,
        "metrics": {"top1": 73.5},
        "method": "KD",
        "teacher": "resnet32x4",
    }
    entry.update(extra)
    return entry


def _write_manifest(path: Path, *entries: dict) -> Path:
    path.write_text(yaml.safe_dump({"checkpoints": list(entries)}, sort_keys=False))
    return path


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next scripted action for its path (the last one repeats)."""

    protocol_version = "HTTP/1.0"  # one request per connection: closing ends the body

    def do_GET(self) -> None:
        script = self.server.script  # type: ignore[attr-defined]
        with script.lock:
            script.hits[self.path] += 1
            actions = script.routes.get(self.path) or [("status", 404)]
            action = actions.pop(0) if len(actions) > 1 else actions[0]
        kind, *args = action
        if kind == "status":
            self.send_response(args[0])
            for key, value in (args[1] if len(args) > 1 else {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = args[0]
        self.send_response(200)
        if kind != "no_length":
            length = args[1] if kind == "length" else len(body)
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if kind == "drop":  # full Content-Length announced, half the body, then the socket closes
            self.wfile.write(body[: len(body) // 2])
        elif kind == "slow":
            for start in range(0, len(body), 16384):
                self.wfile.write(body[start : start + 16384])
                time.sleep(0.05)
        else:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass


class _Script:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.routes: dict[str, list[tuple]] = {}
        self.hits: Counter[str] = Counter()


class _Server:
    def __init__(self) -> None:
        self.script = _Script()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.script = self.script  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def base(self, prefix: str = "a", name: str = NAME) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{prefix}/{name}"

    def serve(self, prefix: str, file_name: str, *actions: tuple, name: str = NAME) -> str:
        path = f"/{prefix}/{name}/{file_name}"
        self.script.routes[path] = list(actions)
        return path

    def serve_all(self, prefix: str = "a", name: str = NAME) -> None:
        for file_name, body in FILES.items():
            self.serve(prefix, file_name, ("ok", body), name=name)

    def hits(self, prefix: str | None = None) -> int:
        return sum(
            n for p, n in self.script.hits.items() if prefix is None or p[1:].startswith(prefix)
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def _fast_and_local(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """No real backoff sleeps (recorded instead), short timeouts, no proxy, no mirror, online."""
    sleeps: list[float] = []
    monkeypatch.setattr(dl, "_sleep", sleeps.append)
    monkeypatch.setattr(dl, "TIMEOUT_S", 5.0)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("KDZOO_HUB_URL", raising=False)
    monkeypatch.delenv("KDZOO_OFFLINE", raising=False)
    monkeypatch.delenv("KDZOO_MANIFEST", raising=False)
    return sleeps


@pytest.fixture
def sleeps(_fast_and_local: list[float]) -> list[float]:
    return _fast_and_local


def _folder() -> Path:
    return Path(os.environ["KDZOO_HOME"]).resolve() / "hub" / NAME


def _assert_nothing_trusted(file_name: str = "model.safetensors") -> None:
    """No file at the final path, no sidecar vouching for one, no temporary file left."""
    folder = _folder()
    assert not (folder / file_name).exists()
    assert not (folder / f"{file_name}.sha256").exists()
    assert not list(folder.glob("*.part"))


# ---- downloads -------------------------------------------------------------------------------


def test_download_verifies_caches_and_then_never_touches_the_network(server, tmp_path):
    server.serve_all()
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([server.base()]))

    folder = dl.download(NAME, manifest_path=manifest, progress=False)

    assert folder == _folder() == dl.cache_dir().resolve() / NAME
    assert str(folder).startswith(str(Path(os.environ["KDZOO_HOME"]).resolve()))
    for file_name, body in FILES.items():
        assert (folder / file_name).read_bytes() == body
        sidecar = (folder / f"{file_name}.sha256").read_text().split()
        assert sidecar == [hashlib.sha256(body).hexdigest(), file_name]
    assert server.hits() == 2
    assert not list(folder.glob("*.part"))

    assert dl.download(NAME, manifest_path=manifest, progress=True) == folder
    assert server.hits() == 2  # cache hit: no request at all


def test_404_is_not_retried_and_falls_back_to_the_next_url(server, tmp_path, sleeps):
    server.serve_all("b")  # nothing under /a/: 404
    manifest = _write_manifest(
        tmp_path / "m.yaml", _entry_dict([server.base("a"), server.base("b")])
    )

    folder = dl.download(NAME, manifest_path=manifest, progress=False)

    assert (folder / "model.safetensors").read_bytes() == MODEL
    assert server.script.hits[f"/a/{NAME}/model.safetensors"] == 1
    assert sleeps == []


def test_5xx_and_429_are_retried_with_backoff(server, tmp_path, sleeps):
    server.serve_all()
    server.serve(
        "a",
        "model.safetensors",
        ("status", 500),
        ("status", 429, {"Retry-After": "2"}),
        ("ok", MODEL),
    )
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([server.base()]))

    folder = dl.download(NAME, manifest_path=manifest, progress=False)

    assert (folder / "model.safetensors").read_bytes() == MODEL
    assert server.script.hits[f"/a/{NAME}/model.safetensors"] == 3
    assert sleeps == [0.5, 2.0]  # 0.5 * 2**0, then the server's Retry-After beats 0.5 * 2**1


def test_connection_dropped_mid_body_is_retried(server, tmp_path, sleeps):
    server.serve_all()
    server.serve("a", "model.safetensors", ("drop", MODEL), ("ok", MODEL))
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([server.base()]))

    folder = dl.download(NAME, manifest_path=manifest, progress=False)

    assert (folder / "model.safetensors").read_bytes() == MODEL
    assert server.script.hits[f"/a/{NAME}/model.safetensors"] == 2
    assert sleeps == [0.5]


def test_connection_always_dropped_ends_in_a_clear_error_and_an_empty_cache(server, tmp_path):
    server.serve_all()
    server.serve("a", "model.safetensors", ("drop", MODEL))
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([server.base()]))

    with pytest.raises(dl.DownloadError) as info:
        dl.download(NAME, manifest_path=manifest, progress=False)

    message = str(info.value)
    assert f"{server.base()}/model.safetensors" in message
    assert "connection closed after" in message and "gave up after 3 attempts" in message
    assert "\n" not in message
    assert server.script.hits[f"/a/{NAME}/model.safetensors"] == dl.ATTEMPTS
    _assert_nothing_trusted()


def test_wrong_content_length_moves_on_without_retrying(server, tmp_path, sleeps):
    # /a/ announces more bytes than the manifest size, /b/ fewer (and sends the whole body).
    server.serve_all("a")
    server.serve("a", "model.safetensors", ("length", MODEL, len(MODEL) + 10))
    server.serve_all("b")
    server.serve("b", "model.safetensors", ("length", MODEL, len(MODEL) - 10))
    manifest = _write_manifest(
        tmp_path / "m.yaml", _entry_dict([server.base("a"), server.base("b")])
    )

    with pytest.raises(dl.DownloadError) as info:
        dl.download(NAME, manifest_path=manifest, progress=False)

    message = str(info.value)
    assert f"server announced {len(MODEL) + 10} bytes (Content-Length)" in message
    assert f"server announced {len(MODEL) - 10} bytes (Content-Length)" in message
    assert server.script.hits[f"/a/{NAME}/model.safetensors"] == 1
    assert sleeps == []
    _assert_nothing_trusted()

    server.serve("b", "model.safetensors", ("ok", MODEL))  # the mirror is fixed
    folder = dl.download(NAME, manifest_path=manifest, progress=False)
    assert (folder / "model.safetensors").read_bytes() == MODEL


def test_body_without_length_longer_than_the_manifest_is_cut_off(server, tmp_path):
    server.serve_all()
    server.serve("a", "model.safetensors", ("no_length", MODEL + b"more"))
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([server.base()]))

    with pytest.raises(dl.DownloadError, match="body longer than the manifest size"):
        dl.download(NAME, manifest_path=manifest, progress=False)
    _assert_nothing_trusted()


def test_sha256_mismatch_leaves_nothing_trusted_and_a_later_call_downloads_again(server, tmp_path):
    corrupt = bytes([MODEL[0] ^ 1]) + MODEL[1:]
    server.serve_all()
    server.serve("a", "model.safetensors", ("ok", corrupt))
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([server.base()]))

    with pytest.raises(dl.DownloadError, match="sha256 mismatch") as info:
        dl.download(NAME, manifest_path=manifest, progress=False)
    assert hashlib.sha256(corrupt).hexdigest() in str(info.value)
    _assert_nothing_trusted()
    assert server.script.hits[f"/a/{NAME}/model.safetensors"] == 1  # wrong content: no retry

    server.serve("a", "model.safetensors", ("ok", MODEL))
    folder = dl.download(NAME, manifest_path=manifest, progress=False)
    assert (folder / "model.safetensors").read_bytes() == MODEL
    assert server.script.hits[f"/a/{NAME}/model.safetensors"] == 2


def test_a_file_at_the_final_path_is_trusted_only_after_rehashing(server, tmp_path):
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([server.base()]))
    folder = _folder()
    folder.mkdir(parents=True)
    # Copied in by hand, no sidecar: adopted after re-hashing, without any request.
    for file_name, body in FILES.items():
        (folder / file_name).write_bytes(body)
    assert dl.download(NAME, manifest_path=manifest, progress=False) == folder
    assert server.hits() == 0
    assert (folder / "model.safetensors.sha256").is_file()

    # An older release (its own sidecar) at the final path and no working URL: removed, not kept.
    old = b"x" * len(MODEL)
    (folder / "model.safetensors").write_bytes(old)
    (folder / "model.safetensors.sha256").write_text(hashlib.sha256(old).hexdigest())
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.download(NAME, manifest_path=manifest, progress=False)
    _assert_nothing_trusted()


def test_unreachable_url_is_retried_once_per_call_not_once_per_file(server, tmp_path, sleeps):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/kdzoo/{NAME}"
    server.serve_all()
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([dead, server.base()]))

    folder = dl.download(NAME, manifest_path=manifest, progress=False)

    assert (folder / "config.json").read_bytes() == CONFIG
    assert sleeps == [0.5, 1.0]  # retries for the first file only; the second skips the dead URL


def test_offline_mode_with_an_empty_cache_fails_clearly_without_any_request(
    server, tmp_path, monkeypatch
):
    server.serve_all()
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([server.base()]))
    monkeypatch.setenv("KDZOO_OFFLINE", "1")

    with pytest.raises(dl.DownloadError) as info:
        dl.download(NAME, manifest_path=manifest, progress=False)

    message = str(info.value)
    assert "KDZOO_OFFLINE=1" in message and "unset KDZOO_OFFLINE" in message
    assert f"kdzoo hub download {NAME}" in message
    assert server.hits() == 0
    assert not _folder().exists()

    monkeypatch.delenv("KDZOO_OFFLINE")
    folder = dl.download(NAME, manifest_path=manifest, progress=False)
    monkeypatch.setenv("KDZOO_OFFLINE", "1")
    assert dl.download(NAME, manifest_path=manifest, progress=False) == folder  # cache hit
    assert server.hits() == 2


def test_kdzoo_hub_url_mirror_is_tried_first(server, tmp_path, monkeypatch):
    server.serve_all("primary")
    server.serve_all("mirror")
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([server.base("primary")]))
    port = server.httpd.server_port
    monkeypatch.setenv("KDZOO_HUB_URL", f"http://127.0.0.1:{port}/mirror/")

    dl.download(NAME, manifest_path=manifest, progress=False)

    assert server.hits("mirror") == 2 and server.hits("primary") == 0


def test_failing_mirror_falls_back_to_the_manifest_urls(server, tmp_path, monkeypatch):
    server.serve_all("primary")  # nothing under /mirror/
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([server.base("primary")]))
    monkeypatch.setenv("KDZOO_HUB_URL", f"http://127.0.0.1:{server.httpd.server_port}/mirror")

    folder = dl.download(NAME, manifest_path=manifest, progress=False)

    assert (folder / "model.safetensors").read_bytes() == MODEL
    assert server.hits("mirror") == 2 and server.hits("primary") == 2

    monkeypatch.setenv("KDZOO_HUB_URL", "ftp://mirror.example.org")
    (folder / "model.safetensors.sha256").unlink()
    (folder / "model.safetensors").unlink()
    with pytest.raises(dl.DownloadError, match="invalid KDZOO_HUB_URL"):
        dl.download(NAME, manifest_path=manifest, progress=False)


def test_file_url_mirror_is_copied_and_verified(tmp_path):
    mirror = tmp_path / "mirror" / NAME
    mirror.mkdir(parents=True)
    for file_name, body in FILES.items():
        (mirror / file_name).write_bytes(body)
    url = "file://" + pathname2url(str(mirror))
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([url]))

    folder = dl.download(NAME, manifest_path=manifest, progress=False)
    assert (folder / "model.safetensors").read_bytes() == MODEL

    (mirror / "config.json").write_bytes(b"{}")  # a corrupted mirror is refused
    (folder / "config.json").unlink()
    with pytest.raises(dl.DownloadError, match=r"config\.json .*received 2 bytes"):
        dl.download(NAME, manifest_path=manifest, progress=False)
    _assert_nothing_trusted("config.json")


def test_hf_hub_url_goes_through_huggingface_hub_and_is_verified(tmp_path, monkeypatch):
    import huggingface_hub

    hf_cache = tmp_path / "hf"
    hf_cache.mkdir()
    calls = []

    def fake_hf_hub_download(repo_id, filename, *, revision=None, local_files_only=False, **kw):
        calls.append((repo_id, filename, revision, local_files_only))
        (hf_cache / filename).write_bytes(FILES[filename])
        return str(hf_cache / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([f"hf-hub:kdzoo/{NAME}@v1"]))

    folder = dl.download(NAME, manifest_path=manifest, progress=False)

    assert (folder / "model.safetensors").read_bytes() == MODEL
    assert sorted(calls) == [
        ("kdzoo/" + NAME, "config.json", "v1", False),
        ("kdzoo/" + NAME, "model.safetensors", "v1", False),
    ]


# ---- manifest validation ---------------------------------------------------------------------

_GOOD_SHA = "a" * 64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "../evil"}, r"name '\.\./evil' is not a valid checkpoint name"),
        ({"name": "resnet8x4/../../x"}, "not a valid checkpoint name"),
        ({"name": "/abs/resnet8x4"}, "not a valid checkpoint name"),
        ({"name": "resnet8x4.a\x00b"}, "not a valid checkpoint name"),
        ({"files": {"/etc/passwd": {"sha256": _GOOD_SHA, "size": 1}}}, "not a plain file name"),
        ({"files": {"../model.safetensors": {"sha256": _GOOD_SHA, "size": 1}}}, "plain file"),
        ({"files": {"model.sha256": {"sha256": _GOOD_SHA, "size": 1}}}, "not a plain file name"),
        (
            {"files": {"m.safetensors": {"sha256": "abc", "size": 1}}},
            r"files\.m\.safetensors: sha256",
        ),
        ({"files": {"m.safetensors": {"sha256": _GOOD_SHA, "size": -1}}}, "size must be"),
        ({"files": {"m": {"sha256": _GOOD_SHA, "size": 1, "md5": "x"}}}, r"unknown \['md5'\]"),
        ({"files": {}}, "files must be a non-empty mapping"),
        ({"metric": {"top1": 1.0}}, r"unknown field 'metric' \(did you mean 'metrics'\?\)"),
        ({"urls": ["ftp://example.org/x"]}, "unsupported scheme"),
        ({"urls": ["http://example.org/x"]}, "plain http is allowed only on loopback"),
        ({"urls": ["https://example.org/x?token=1"]}, "query"),
        ({"urls": "https://example.org/x"}, "urls must be a non-empty list"),
        ({"urls": ["hf-hub:../x"]}, "hf-hub:<namespace>/<repo>"),
        ({"architecture": "resnet18"}, "does not match the name's 'arch' part"),
        ({"num_classes": True}, "num_classes must be an integer"),
        ({"config": "../secrets.yaml"}, "config must be a relative path"),
    ],
)
def test_manifest_validation_errors_name_the_entry_and_field(tmp_path, change, message):
    entry = _entry_dict(["https://example.org/kdzoo/" + NAME])
    entry.update(change)
    manifest = _write_manifest(tmp_path / "m.yaml", entry)

    with pytest.raises(ManifestError, match=message) as info:
        read_manifest(manifest)
    assert str(manifest) in str(info.value) and "checkpoints[0]" in str(info.value)


def test_manifest_refuses_duplicate_names_and_missing_fields(tmp_path):
    entry = _entry_dict(["https://example.org/kdzoo/" + NAME])
    with pytest.raises(ManifestError, match=rf"checkpoints\[1\] \({NAME}\): duplicate name"):
        read_manifest(_write_manifest(tmp_path / "m.yaml", entry, entry))
    del entry["files"]
    with pytest.raises(ManifestError, match="missing required field files"):
        read_manifest(_write_manifest(tmp_path / "m.yaml", entry))
    (tmp_path / "bad.yaml").write_text("checkpoints: [\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        read_manifest(tmp_path / "bad.yaml")
    with pytest.raises(ManifestError, match=r"manifest not found.*KDZOO_MANIFEST"):
        read_manifest(tmp_path / "absent.yaml")


def test_manifest_reads_back_typed_entries_and_find_suggests_close_names(tmp_path, monkeypatch):
    upper = _entry_dict(["https://example.org/kdzoo/" + NAME + "/", "file:///mnt/mirror/x"])
    upper["files"]["config.json"]["sha256"] = upper["files"]["config.json"]["sha256"].upper()
    manifest = _write_manifest(tmp_path / "m.yaml", upper)
    monkeypatch.setenv("KDZOO_MANIFEST", str(manifest))
    assert default_manifest_path() == manifest

    entry = find(NAME)
    assert entry.urls == (f"https://example.org/kdzoo/{NAME}", "file:///mnt/mirror/x")
    assert entry.files["config.json"] == FileEntry(hashlib.sha256(CONFIG).hexdigest(), len(CONFIG))
    assert (entry.architecture, entry.num_classes, entry.in_chans) == ("resnet8x4", 10, 3)
    assert (entry.metrics, entry.method, entry.teacher, entry.config) == (
        {"top1": 73.5},
        "KD",
        "resnet32x4",
        None,
    )
    with pytest.raises(ManifestError, match=rf"did you mean '{NAME}'"):
        find("resnet8x4.kd_tset", manifest)

    monkeypatch.delenv("KDZOO_MANIFEST")
    assert default_manifest_path().parts[-2:] == ("checkpoints", "manifest.yaml")


def test_path_traversal_is_refused_even_when_building_entries_in_code(tmp_path):
    files = {"model.safetensors": FileEntry(_GOOD_SHA, 1)}
    common = {"urls": ("https://example.org/x",), "architecture": "resnet8x4", "num_classes": 1}
    with pytest.raises(ManifestError, match="not a valid checkpoint name"):
        ManifestEntry(name="../../etc", files=files, **common)
    with pytest.raises(ManifestError, match="not a plain file name"):
        ManifestEntry(name="resnet8x4.x", files={"../../x": FileEntry(_GOOD_SHA, 1)}, **common)
    with pytest.raises(ManifestError, match="not a valid checkpoint name"):
        dl.entry_dir("..")

    # Validation bypassed after construction: download still refuses to leave the cache.
    entry = ManifestEntry(name="resnet8x4.x", files=files, **common)
    object.__setattr__(entry, "name", "../../escape")
    with pytest.raises(ManifestError):
        dl.download(entry, progress=False)
    entry = ManifestEntry(name="resnet8x4.x", files=files, **common)
    entry.files["../../escape"] = FileEntry(_GOOD_SHA, 1)
    with pytest.raises(ManifestError):
        dl.download(entry, progress=False)
    home = Path(os.environ["KDZOO_HOME"])
    assert not (home / "escape").exists() and not (home.parent / "escape").exists()


# ---- verify ----------------------------------------------------------------------------------


def test_verify_reports_ok_mismatch_missing_and_unknown_files(server, tmp_path):
    server.serve_all()
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([server.base()]))
    folder = dl.download(NAME, manifest_path=manifest, progress=False)

    assert sorted(dl.verify(manifest_path=manifest)) == [
        (NAME, "config.json", "ok"),
        (NAME, "model.safetensors", "ok"),
    ]

    model = folder / "model.safetensors"
    model.write_bytes(bytes([MODEL[0] ^ 1]) + MODEL[1:])  # same size: only a re-hash sees it
    (folder / "config.json").unlink()
    (folder / "notes.txt").write_text("mine")
    assert sorted(dl.verify([NAME], manifest_path=manifest)) == [
        (NAME, "config.json", "missing"),
        (NAME, "model.safetensors", "mismatch"),
        (NAME, "notes.txt", "not in manifest"),
    ]
    assert not model.exists() and (folder / "model.safetensors.corrupt").is_file()
    assert not (folder / "model.safetensors.sha256").exists()

    before = server.hits()
    dl.download(NAME, manifest_path=manifest, progress=False)  # never trusts the corrupt file
    assert server.hits() == before + 2 and model.read_bytes() == MODEL
    with pytest.raises(ManifestError, match="no checkpoint named"):
        dl.verify(["resnet8x4.unknown"], manifest_path=manifest)


# ---- concurrency -----------------------------------------------------------------------------


def _download_in_child(manifest: str, home: str, barrier, results) -> None:
    """Runs in a spawned process: start together with the other one, then download."""
    os.environ["KDZOO_HOME"] = home
    module = importlib.import_module("kdzoo.hub.fetch")
    barrier.wait(timeout=60)
    try:
        results.put(("ok", str(module.download(NAME, manifest_path=manifest, progress=False))))
    except Exception as err:  # reported to the parent, which fails the test with it
        results.put(("error", repr(err)))


def test_two_processes_downloading_at_once_both_succeed_with_one_intact_file(server, tmp_path):
    server.serve_all()
    server.serve("a", "model.safetensors", ("slow", MODEL))  # ~0.8 s: the two runs overlap
    manifest = _write_manifest(tmp_path / "m.yaml", _entry_dict([server.base()]))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (str(manifest), os.environ["KDZOO_HOME"], barrier, results)
    procs = [ctx.Process(target=_download_in_child, args=args) for _ in range(2)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)

    assert outcomes == [("ok", str(_folder()))] * 2
    assert all(proc.exitcode == 0 for proc in procs)
    folder = _folder()
    assert (folder / "model.safetensors").read_bytes() == MODEL
    assert not list(folder.glob("*.part"))
    # The lock makes the second process wait and then find the verified file.
    assert server.script.hits[f"/a/{NAME}/model.safetensors"] == 1
    assert dl.verify([NAME], manifest_path=manifest) == [
        (NAME, "model.safetensors", "ok"),
        (NAME, "config.json", "ok"),
    ]
