"""Downloading published checkpoints into a verified cache, and re-verifying that cache.

Files of entry ``NAME`` live in ``$KDZOO_HOME/hub/NAME/`` (see :func:`cache_dir`). The rules:

* **Nothing unverified reaches a final path.** A file is streamed into
  ``<file>.<pid>.<random>.part`` in the same folder while its sha256 is computed, its byte count is
  checked against the ``Content-Length`` and the manifest size, and it is ``os.replace``-d into
  place only when the sha256 matches the manifest. Any failure deletes the temporary file.
* **A cache hit never touches the network.** After verification a sidecar ``<file>.sha256``
  (``sha256sum`` format) is written. A later call trusts a file whose size matches the manifest
  and whose sidecar holds the manifest's sha256, without re-hashing it: loading a cached student
  stays fast, and the sidecar proves this cache verified exactly this content (a file replaced
  by a newer release, or half-written before a crash, has no matching sidecar and is fetched
  again). Corruption *after* verification (disk faults, edits by hand) is what :func:`verify` is
  for: it re-hashes every file and moves mismatching ones aside.
* **Sources, in order:** ``$KDZOO_HUB_URL/NAME`` when that variable is set (a mirror), then the
  entry's URLs. Transient failures (connection errors, timeouts, HTTP 5xx/408/429, truncated
  bodies) are retried with exponential backoff; 404/403 and content that is not what the manifest
  says move on to the next URL at once. When everything fails, :class:`DownloadError` lists every
  URL and why it failed.
* **``KDZOO_OFFLINE=1`` never touches the network:** cached files are used, ``file://`` mirrors
  and the local Hugging Face cache may still fill the cache, anything else is an error saying so.
* **Concurrent downloads are safe:** a per-entry lock (``NAME/.lock``) is held while fetching; a
  process that waited for it finds the verified files and returns them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import secrets
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple
from urllib.parse import urlsplit

import filelock
from tqdm.auto import tqdm

import kdzoo
from kdzoo.errors import KDZooError
from kdzoo.hub.manifest import (
    RESERVED_SUFFIXES,
    FileEntry,
    ManifestEntry,
    ManifestError,
    check_file_name,
    check_name,
    check_url,
    find,
    read_manifest,
)
from kdzoo.paths import kdzoo_home

__all__ = [
    "DownloadError",
    "VerifyResult",
    "cache_dir",
    "download",
    "entry_dir",
    "is_offline",
    "sha256_file",
    "verify",
]

# Retry policy per URL: ATTEMPTS tries, waiting BACKOFF_S * 2**k between them (0.5 s, 1 s).
ATTEMPTS = 3
BACKOFF_S = 0.5
# A server's Retry-After is honoured up to this many seconds.
MAX_RETRY_AFTER_S = 60.0
# Socket timeout for connecting and for each read.
TIMEOUT_S = 30.0
_CHUNK = 1 << 20
_USER_AGENT = f"kdzoo/{kdzoo.__version__}"
# Module-level so tests replace it (``monkeypatch.setattr(module, "_sleep", ...)``).
_sleep = time.sleep

_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


class DownloadError(KDZooError, RuntimeError):
    """A checkpoint file could not be obtained (all URLs failed, offline mode, unwritable cache)."""


class VerifyResult(NamedTuple):
    """One line of :func:`verify`'s report."""

    name: str
    file: str
    status: str  # "ok", "mismatch", "missing" or "not in manifest"


class _Transient(Exception):
    """Worth retrying the same URL (network hiccup, overloaded server, truncated body)."""

    def __init__(self, reason: str, *, retry_after: float | None = None, unreachable: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.unreachable = unreachable  # could not connect at all: skip this base for other files


class _Permanent(Exception):
    """Retrying this URL will not help (404, wrong size or sha256): go to the next URL."""


def is_offline() -> bool:
    """Whether ``KDZOO_OFFLINE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get("KDZOO_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    """Root of the checkpoint cache: ``$KDZOO_HOME/hub`` (default ``~/.cache/kdzoo/hub``)."""
    return kdzoo_home() / "hub"


def entry_dir(name: str) -> Path:
    """The cache folder of checkpoint ``name`` (resolved), guaranteed to lie inside the cache."""
    check_name(name)
    root = cache_dir().resolve()
    folder = (root / name).resolve()
    # Defence in depth: names are validated, but never let a crafted one escape the cache.
    if folder.parent != root:
        raise ManifestError(f"checkpoint name {name!r} resolves outside the cache {root}")
    return folder


def _file_path(folder: Path, file_name: str) -> Path:
    check_file_name(file_name)
    path = (folder / file_name).resolve()
    if path.parent != folder or not path.is_relative_to(folder):
        raise ManifestError(f"file name {file_name!r} resolves outside {folder}")
    return path


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_cached(path: Path, sha256: str, size: int) -> bool:
    """Cache-hit test without re-hashing: right size and a sidecar recording the right sha256."""
    try:
        if path.stat().st_size != size:
            return False
        recorded = _sidecar(path).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(recorded) and recorded[0].lower() == sha256


def _write_sidecar(path: Path, sha256: str) -> None:
    sidecar = _sidecar(path)
    tmp = sidecar.with_name(f"{sidecar.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    tmp.write_text(f"{sha256}  {path.name}\n", encoding="ascii")
    os.replace(tmp, sidecar)


def _resolve_entry(name_or_entry: str | ManifestEntry, manifest_path: str | Path | None):
    if isinstance(name_or_entry, ManifestEntry):
        return name_or_entry
    return find(name_or_entry, read_manifest(manifest_path))


def download(
    name_or_entry: str | ManifestEntry,
    *,
    manifest_path: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Make sure every file of a checkpoint is in the cache, verified, and return its folder.

    Args:
        name_or_entry: a manifest name (looked up in ``manifest_path``, default
            :func:`~kdzoo.hub.manifest.default_manifest_path`) or a :class:`ManifestEntry`.
        manifest_path: manifest to look the name up in.
        progress: show a progress bar per file (only on a terminal).

    Returns:
        ``cache_dir() / name``, holding every file of the entry with its verified sha256.

    Raises:
        DownloadError: a file could not be obtained from any source, or is missing in offline
            mode; the message lists each URL tried and why it failed.
        ManifestError: unknown name or invalid entry.
    """
    entry = _resolve_entry(name_or_entry, manifest_path)
    folder = entry_dir(entry.name)
    paths = {file_name: _file_path(folder, file_name) for file_name in entry.files}

    def missing() -> list[str]:
        return [
            f for f, spec in entry.files.items() if not _is_cached(paths[f], spec.sha256, spec.size)
        ]

    todo = missing()
    if not todo:
        return folder
    network_only = all(_scheme(base) in ("http", "https") for base in _sources(entry))
    if is_offline() and network_only and not folder.is_dir():
        # Nothing to try without the network: fail before creating anything in the cache.
        file_name = todo[0]
        skipped = [
            f"{_url(base, file_name)} (skipped: KDZOO_OFFLINE=1)" for base in _sources(entry)
        ]
        raise _failure(entry, file_name, paths[file_name], skipped, offline=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create the cache folder {folder}: {err}") from None

    with _entry_lock(folder):
        _remove_stale_parts(folder)
        unreachable: dict[str, str] = {}  # base URL -> reason, shared by the files of this call
        for file_name in missing():  # re-checked: another process may have fetched them
            if not _adopt(paths[file_name], entry.files[file_name]):
                _fetch_file(entry, file_name, paths[file_name], unreachable, progress)
    return folder


def _adopt(path: Path, spec: FileEntry) -> bool:
    """Trust a file already at ``path`` without a valid sidecar only after re-hashing it (a file
    copied in by hand, or a crash between the rename and the sidecar); otherwise delete it, so
    that even a failed download leaves nothing at the final path."""
    if not path.exists():
        with contextlib.suppress(OSError):
            _sidecar(path).unlink()  # must not vouch for whatever appears there later
        return False
    with contextlib.suppress(OSError):
        size_ok = path.is_file() and path.stat().st_size == spec.size
        if size_ok and sha256_file(path) == spec.sha256:
            _write_sidecar(path, spec.sha256)
            return True
    for stale in (_sidecar(path), path):
        with contextlib.suppress(OSError):
            stale.unlink()
    return False


@contextlib.contextmanager
def _entry_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` (an OS file lock, released even if the holder dies)."""
    lock = filelock.FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=1)
    except filelock.Timeout:
        print(
            f"kdzoo: waiting for another process downloading into {folder} (lock {lock.lock_file})",
            file=sys.stderr,
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _remove_stale_parts(folder: Path) -> None:
    """Delete temporary files left by killed downloads (every writer holds the lock we now hold)."""
    for part in folder.glob("*.part"):
        with contextlib.suppress(OSError):
            part.unlink()


def _sources(entry: ManifestEntry) -> list[str]:
    """Base URLs to try, in order: the ``KDZOO_HUB_URL`` mirror first, then the manifest's."""
    bases = []
    mirror = os.environ.get("KDZOO_HUB_URL", "").strip()
    if mirror:
        try:
            bases.append(check_url(f"{mirror.rstrip('/')}/{entry.name}", what="KDZOO_HUB_URL"))
        except ManifestError as err:
            raise DownloadError(f"invalid KDZOO_HUB_URL={mirror!r}: {err}") from None
    bases += [check_url(u) for u in entry.urls if u not in bases]
    return bases


def _scheme(base: str) -> str:
    return "hf-hub" if base.startswith("hf-hub:") else urlsplit(base).scheme


def _url(base: str, file_name: str) -> str:
    return f"{base}/{file_name}"


def _fetch_file(
    entry: ManifestEntry, file_name: str, dest: Path, unreachable: dict[str, str], progress: bool
) -> None:
    """Fetch one file from the first source that delivers the manifest's content."""
    spec = entry.files[file_name]
    offline = is_offline()
    failures: list[str] = []
    for base in _sources(entry):
        scheme, url = _scheme(base), _url(base, file_name)
        if offline and scheme in ("http", "https"):
            failures.append(f"{url} (skipped: KDZOO_OFFLINE=1)")
            continue
        if base in unreachable:
            failures.append(f"{url} (skipped: {unreachable[base]})")
            continue
        try:
            if scheme == "hf-hub":
                _fetch_hf(base, file_name, dest, spec.sha256, spec.size, offline)
            elif scheme == "file":
                _fetch_local(Path(urllib.request.url2pathname(urlsplit(url).path)), dest, spec)
            else:
                _fetch_http(url, dest, spec.sha256, spec.size, progress, entry.name)
        except (_Permanent, _Transient) as err:
            failures.append(f"{url} ({err})")
            if isinstance(err, _Transient) and err.unreachable:
                unreachable[base] = f"unreachable earlier: {err}"
            continue
        try:
            _write_sidecar(dest, spec.sha256)
        except OSError as err:
            raise DownloadError(f"cannot write {_sidecar(dest)}: {err}") from None
        return
    raise _failure(entry, file_name, dest, failures, offline=offline)


def _failure(
    entry: ManifestEntry, file_name: str, dest: Path, failures: list[str], *, offline: bool
) -> DownloadError:
    """The one-paragraph error: what was wanted, each URL tried and why it failed, what to do."""
    spec = entry.files[file_name]
    if offline:
        how = (
            "KDZOO_OFFLINE=1 is set, so only the cache, file:// mirrors and the local Hugging Face "
            "cache are used: unset KDZOO_OFFLINE to download, or run `kdzoo hub download "
            f"{entry.name}` on a machine with network access and copy {dest.parent} into "
            f"{cache_dir()}"
        )
    else:
        how = (
            "Check the network, or set KDZOO_HUB_URL to a mirror that serves "
            f"<KDZOO_HUB_URL>/{entry.name}/{file_name}"
        )
    return DownloadError(
        f"could not download {file_name} of checkpoint {entry.name} (sha256 {spec.sha256[:12]}..., "
        f"{spec.size} bytes); tried: {'; '.join(failures) or 'no source'}. Nothing was written to "
        f"{dest}. {how}."
    )


def _fetch_local(source: Path, dest: Path, spec: FileEntry) -> None:
    """Copy a ``file://`` mirror's file into the cache, verifying it on the way."""
    try:
        stream = open(source, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as err:
        raise _Permanent(f"cannot open {source}: {err.strerror or err}") from None
    with stream:
        _stream_to_cache(stream, dest, spec.sha256, spec.size, None, "", False)


def _fetch_http(url: str, dest: Path, sha256: str, size: int, progress: bool, name: str) -> None:
    """Download ``url`` into ``dest`` with retries; raise the last failure when they run out."""
    for attempt in range(ATTEMPTS):
        try:
            return _http_once(url, dest, sha256, size, progress, f"{name}/{dest.name}")
        except _Transient as err:
            if attempt + 1 == ATTEMPTS:
                raise _Transient(
                    f"{err}; gave up after {ATTEMPTS} attempts", unreachable=err.unreachable
                ) from None
            delay = BACKOFF_S * 2**attempt
            if err.retry_after is not None:
                delay = max(delay, min(err.retry_after, MAX_RETRY_AFTER_S))
            _sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _http_once(url: str, dest: Path, sha256: str, size: int, progress: bool, desc: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code in _TRANSIENT_HTTP:
            raise _Transient(
                f"HTTP {err.code} {err.reason}", retry_after=_retry_after(err.headers)
            ) from None
        raise _Permanent(f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        reason = err.reason
        # Refused, unknown host or no answer: other files of this call skip this base URL.
        dead = isinstance(reason, (ConnectionRefusedError, TimeoutError, socket.gaierror)) or (
            getattr(reason, "errno", None) in (errno.EHOSTUNREACH, errno.ENETUNREACH)
        )
        raise _Transient(
            f"connection failed: {getattr(reason, 'strerror', None) or reason}", unreachable=dead
        ) from None
    except TimeoutError:
        raise _Transient(f"timed out after {TIMEOUT_S:g} s", unreachable=True) from None
    except (http.client.HTTPException, OSError) as err:
        raise _Transient(f"connection failed: {type(err).__name__}: {err}") from None

    with response:
        length = response.headers.get("Content-Length")
        announced = int(length) if length and length.strip().isdigit() else None
        if announced is not None and announced != size:
            raise _Permanent(
                f"server announced {announced} bytes (Content-Length) but the manifest says {size}"
            )
        _stream_to_cache(response, dest, sha256, size, announced, desc, progress)


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date; the exponential backoff is used instead


def _stream_to_cache(
    stream: BinaryIO,
    dest: Path,
    sha256: str,
    size: int,
    announced: int | None,
    desc: str,
    progress: bool,
) -> None:
    """Copy ``stream`` into a temporary file next to ``dest`` while hashing it, and move it to
    ``dest`` only if its length and sha256 are the manifest's. Network read errors raise
    :class:`_Transient`, wrong content :class:`_Permanent`, local write errors
    :class:`DownloadError`; the temporary file never survives a failure."""
    part = dest.with_name(f"{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    digest = hashlib.sha256()
    received = 0
    try:
        try:
            out = open(part, "xb")  # noqa: SIM115 (closed below, before the rename)
        except OSError as err:
            raise DownloadError(f"cannot write to the cache {dest.parent}: {err}") from None
        bar = tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=None if progress else True,  # None: shown on a terminal only
            leave=False,
        )
        with out, bar:
            while True:
                try:
                    chunk = stream.read(_CHUNK)
                except http.client.IncompleteRead as err:
                    raise _Transient(
                        f"connection closed after {received + len(err.partial)} of "
                        f"{announced if announced is not None else size} bytes"
                    ) from None
                except TimeoutError:
                    raise _Transient(f"read timed out after {received} bytes") from None
                except (http.client.HTTPException, OSError) as err:
                    raise _Transient(
                        f"connection lost after {received} bytes: {type(err).__name__}"
                    ) from None
                if not chunk:
                    break
                received += len(chunk)
                if received > size:
                    # Never store more than the manifest promises (a wrong or hostile server).
                    raise _Permanent(f"body longer than the manifest size {size} bytes")
                digest.update(chunk)
                try:
                    out.write(chunk)
                except OSError as err:
                    raise DownloadError(f"cannot write {part}: {err}") from None
                bar.update(len(chunk))
            if announced is not None and received != announced:
                raise _Transient(
                    f"connection closed after {received} of {announced} bytes (Content-Length)"
                )
            if received != size:
                raise _Permanent(f"received {received} bytes, the manifest says {size}")
            if digest.hexdigest() != sha256:
                raise _Permanent(
                    f"sha256 mismatch: got {digest.hexdigest()}, the manifest says {sha256}"
                )
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as err:
                raise DownloadError(f"cannot write {part}: {err}") from None
        # A stale sidecar must never vouch for new content if we die between the two steps.
        with contextlib.suppress(FileNotFoundError):
            _sidecar(dest).unlink()
        try:
            os.replace(part, dest)
        except OSError as err:
            raise DownloadError(f"cannot move {part} to {dest}: {err}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


def _fetch_hf(base: str, file_name: str, dest: Path, sha256: str, size: int, offline: bool) -> None:
    """Fetch through huggingface_hub (its own cache, auth and ``HF_HUB_OFFLINE``), then copy and
    verify into ours. With ``KDZOO_OFFLINE=1`` only its local cache is consulted."""
    try:
        import huggingface_hub
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise _Permanent(f"huggingface_hub is not installed ({err})") from None
    repo_id, _, revision = base[len("hf-hub:") :].partition("@")
    try:
        local = huggingface_hub.hf_hub_download(
            repo_id,
            file_name,
            revision=revision or None,
            local_files_only=offline,
            library_name="kdzoo",
            library_version=kdzoo.__version__,
        )
    except Exception as err:  # huggingface_hub's error types vary across its versions
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise _Permanent(f"huggingface_hub: {type(err).__name__}: {message}") from None
    _fetch_local(Path(local), dest, FileEntry(sha256, size))


def verify(
    names: Iterable[str] | None = None, *, manifest_path: str | Path | None = None
) -> list[VerifyResult]:
    """Re-hash cached files against the manifest.

    Args:
        names: entries to check; ``None`` checks every entry that has a folder in the cache
            (entries never downloaded are not reported as missing).
        manifest_path: manifest to compare with (default manifest if ``None``).

    Returns:
        One :class:`VerifyResult` per file: ``ok``; ``mismatch`` (wrong size or sha256: the
        file is moved aside to ``<file>.corrupt`` and its sidecar removed, so it is never trusted
        again and the next download fetches it anew); ``missing`` (in the manifest, not in the
        cache); ``not in manifest`` (a cached file or entry the manifest does not list, left
        untouched).
    """
    manifest = read_manifest(manifest_path)
    root = cache_dir()
    if names is None:
        selected = (
            sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink())
            if root.is_dir()
            else []
        )
    else:
        selected = list(names)
        for name in selected:
            if name not in manifest and not (root / check_name(name)).is_dir():
                find(name, manifest)  # raises, with close names

    results: list[VerifyResult] = []
    for name in selected:
        try:
            folder = entry_dir(name)
        except ManifestError:
            continue  # not a folder this cache could have created
        entry = manifest.get(name)
        if not folder.is_dir():
            results += [VerifyResult(name, f, "missing") for f in (entry.files if entry else ())]
            continue
        with _entry_lock(folder):
            if entry is not None:
                for file_name, spec in entry.files.items():
                    path = _file_path(folder, file_name)
                    results.append(VerifyResult(name, file_name, _verify_file(path, spec)))
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or path.name.endswith(RESERVED_SUFFIXES):
                    continue
                if entry is None or path.name not in entry.files:
                    results.append(VerifyResult(name, path.name, "not in manifest"))
    return results


def _verify_file(path: Path, spec: FileEntry) -> str:
    if not path.is_file():
        return "missing"
    try:
        ok = path.stat().st_size == spec.size and sha256_file(path) == spec.sha256
    except OSError as err:
        if err.errno == errno.ENOENT:
            return "missing"
        raise DownloadError(f"cannot read {path}: {err}") from None
    if ok:
        _write_sidecar(path, spec.sha256)
        return "ok"
    with contextlib.suppress(FileNotFoundError):
        _sidecar(path).unlink()
    os.replace(path, path.with_name(path.name + ".corrupt"))
    return "mismatch"
