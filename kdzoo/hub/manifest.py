"""The checkpoint manifest: which published checkpoints exist, where to get them, how to check them.

``checkpoints/manifest.yaml`` lists one entry per published checkpoint::

    checkpoints:
      - name: resnet8x4.kd_resnet32x4_cifar100        # timm ``arch.tag`` grammar
        urls:                                          # base locations, tried in order
          - https://example.org/kdzoo/resnet8x4.kd_resnet32x4_cifar100
          - hf-hub:kdzoo/resnet8x4.kd_resnet32x4_cifar100   # optionally ``@revision``
          - file:///mnt/mirror/resnet8x4.kd_resnet32x4_cifar100
        files:                                         # file URL = base + "/" + file name
          model.safetensors: {sha256: <64 hex digits>, size: <bytes>}
          config.json: {sha256: <64 hex digits>, size: <bytes>}
        architecture: resnet8x4
        num_classes: 100
        in_chans: 3                                    # optional, default 3
        metrics: {top1: 73.5}                          # optional
        config: configs/cifar100/kd/resnet32x4_resnet8x4.yaml   # optional, repo-relative
        method: KD                                     # optional
        teacher: resnet32x4                            # optional

Everything from a manifest ends up in file-system paths and URLs, so validation is strict and
happens when a :class:`ManifestEntry` is constructed (not only when a YAML file is read): names and
file names cannot leave the cache folder, URLs are limited to https, ``hf-hub:``, ``file://`` and
plain http on loopback only (the tests serve on 127.0.0.1; published checkpoints use https, and
integrity never rests on the transport because every file is checked against its sha256), and
unknown keys are refused so that a typo (``sha265``) is an error instead of an ignored field.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from kdzoo.errors import KDZooError

__all__ = [
    "FileEntry",
    "ManifestEntry",
    "ManifestError",
    "check_file_name",
    "check_name",
    "check_url",
    "default_manifest_path",
    "find",
    "read_manifest",
]

# timm's ``arch.tag`` grammar: a lower-case architecture, optionally a dot and a tag. No path
# separators, no ``..``, nothing absolute, so a name is always a single safe folder name.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_]*(\.[a-z0-9][a-z0-9_\-]*)?")
_ARCH_RE = re.compile(r"[a-z0-9][a-z0-9_]*")
# A plain file name: no separators, cannot be ``.``/``..`` or start with a dot (hidden files).
_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
# ``hf-hub:[namespace/]repo[@revision]``, huggingface_hub's repo id rules (no ``..`` either).
_HF_REPO_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._\-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._\-]{0,95})?(@[A-Za-z0-9._/\-]+)?"
)
_MAX_NAME_LEN = 200
# Suffixes the download cache uses for its own bookkeeping next to the published files.
RESERVED_SUFFIXES = (".part", ".sha256", ".corrupt", ".lock")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ManifestError(KDZooError, ValueError):
    """The manifest (or a name looked up in it) is invalid: the message names entry and field."""


def check_name(name: Any, *, what: str = "name") -> str:
    """``name`` if it follows timm's ``arch.tag`` grammar, else :class:`ManifestError`.

    A valid name is a single folder name (it becomes ``<cache>/<name>/``), so this is also the
    path-traversal guard: no ``/``, ``\\``, ``..``, absolute paths or NUL bytes can pass.
    """
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > _MAX_NAME_LEN or not _NAME_RE.fullmatch(name):
        raise ManifestError(
            f"{what} {name!r} is not a valid checkpoint name: use timm's 'arch.tag' form, "
            "lower-case letters, digits and '_' (the tag may also use '-'), e.g. "
            "'resnet8x4.kd_resnet32x4_cifar100'; path separators, '..' and absolute paths are "
            "refused"
        )
    return name


def check_file_name(file_name: Any, *, what: str = "file name") -> str:
    """``file_name`` if it is a plain file name that stays inside its entry's cache folder."""
    if not isinstance(file_name, str) or not file_name:
        raise ManifestError(f"{what} must be a non-empty string, got {file_name!r}")
    if (
        len(file_name) > _MAX_NAME_LEN
        or not _FILE_RE.fullmatch(file_name)
        or ".." in file_name
        or file_name.endswith(RESERVED_SUFFIXES)
    ):
        raise ManifestError(
            f"{what} {file_name!r} is not a plain file name: use letters, digits, '_', '-' and '.' "
            "without a leading dot or '..', no path separators or absolute paths, and none of the "
            f"cache's own suffixes {', '.join(RESERVED_SUFFIXES)}"
        )
    return file_name


def check_url(url: Any, *, what: str = "url") -> str:
    """``url`` without a trailing slash if it is a base location kdzoo may download from.

    Allowed: ``https://host/path``, ``hf-hub:[namespace/]repo[@revision]``,
    ``file:///absolute/path`` and ``http://`` on loopback hosts only (127.0.0.1, localhost, ::1:
    the tests' local server). Query strings and fragments are refused because file names are
    appended to the base as path components.
    """
    if not isinstance(url, str) or not url or "\x00" in url or url != url.strip():
        raise ManifestError(f"{what} must be a non-empty string without spaces, got {url!r}")
    url = url.rstrip("/")
    if url.startswith("hf-hub:"):
        repo = url[len("hf-hub:") :]
        if not _HF_REPO_RE.fullmatch(repo) or ".." in repo:
            raise ManifestError(
                f"{what} {url!r}: expected 'hf-hub:<namespace>/<repo>' (optionally '@<revision>')"
            )
        return url
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ManifestError(f"{what} {url!r}: a base URL cannot have a query or a fragment")
    if ".." in PurePosixPath(parts.path).parts:
        raise ManifestError(f"{what} {url!r}: '..' is not allowed in a URL path")
    if parts.scheme == "https":
        if not parts.hostname:
            raise ManifestError(f"{what} {url!r}: missing host")
        return url
    if parts.scheme == "http":
        if parts.hostname not in LOOPBACK_HOSTS:
            raise ManifestError(
                f"{what} {url!r}: plain http is allowed only on loopback hosts "
                f"({', '.join(sorted(LOOPBACK_HOSTS))}), for local tests; use https"
            )
        return url
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ManifestError(f"{what} {url!r}: expected 'file:///absolute/path'")
        return url
    raise ManifestError(
        f"{what} {url!r}: unsupported scheme; use https://, hf-hub:, file:// "
        "(or http:// on 127.0.0.1/localhost)"
    )


@dataclass(frozen=True)
class FileEntry:
    """Expected content of one published file: its sha256 (lower-case hex) and size in bytes."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _SHA256_RE.fullmatch(self.sha256):
            raise ManifestError(
                f"sha256 must be a string of 64 hex digits, got {self.sha256!r} "
                "(quote it in YAML so it stays a string)"
            )
        object.__setattr__(self, "sha256", self.sha256.lower())
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise ManifestError(f"size must be an integer >= 0 (bytes), got {self.size!r}")


@dataclass(frozen=True)
class ManifestEntry:
    """One published checkpoint. Construction validates every field (see module docstring), so an
    entry built in code is exactly as safe as one read from the YAML file.

    ``files`` maps a plain file name to its :class:`FileEntry`; treat ``files`` and ``metrics`` as
    read-only (they are copies of what was passed in).
    """

    name: str
    urls: tuple[str, ...]
    files: dict[str, FileEntry]
    architecture: str
    num_classes: int
    in_chans: int = 3
    metrics: dict[str, float] = field(default_factory=dict)
    config: str | None = None
    method: str | None = None
    teacher: str | None = None

    def __post_init__(self) -> None:
        try:
            self._validate()
        except ManifestError as err:
            label = self.name if isinstance(self.name, str) else repr(self.name)
            raise ManifestError(f"checkpoint {label}: {err}") from None

    def _validate(self) -> None:
        check_name(self.name)
        if isinstance(self.urls, str) or not isinstance(self.urls, (list, tuple)) or not self.urls:
            raise ManifestError(f"urls must be a non-empty list, got {self.urls!r}")
        urls = tuple(check_url(u, what=f"urls[{i}]") for i, u in enumerate(self.urls))
        object.__setattr__(self, "urls", urls)

        if not isinstance(self.files, Mapping) or not self.files:
            raise ManifestError(
                "files must be a non-empty mapping of file name -> {sha256, size}, got "
                f"{self.files!r}"
            )
        files: dict[str, FileEntry] = {}
        for file_name, spec in self.files.items():
            check_file_name(file_name, what="files:")
            if isinstance(spec, Mapping):
                unknown = set(spec) - {"sha256", "size"}
                missing = {"sha256", "size"} - set(spec)
                if unknown or missing:
                    raise ManifestError(
                        f"files.{file_name}: expected exactly the keys sha256 and size"
                        + (f"; unknown {sorted(unknown)}" if unknown else "")
                        + (f"; missing {sorted(missing)}" if missing else "")
                    )
                try:
                    spec = FileEntry(sha256=spec["sha256"], size=spec["size"])
                except ManifestError as err:
                    raise ManifestError(f"files.{file_name}: {err}") from None
            elif not isinstance(spec, FileEntry):
                raise ManifestError(f"files.{file_name}: expected {{sha256, size}}, got {spec!r}")
            files[file_name] = spec
        object.__setattr__(self, "files", files)

        if not isinstance(self.architecture, str) or not _ARCH_RE.fullmatch(self.architecture):
            raise ManifestError(
                f"architecture must be a timm model name (lower-case letters, digits, '_'), "
                f"got {self.architecture!r}"
            )
        if self.name.split(".", 1)[0] != self.architecture:
            raise ManifestError(
                f"architecture {self.architecture!r} does not match the name's 'arch' part "
                f"{self.name.split('.', 1)[0]!r} (timm names are 'arch.tag')"
            )
        for key in ("num_classes", "in_chans"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ManifestError(f"{key} must be an integer >= 1, got {value!r}")

        if not isinstance(self.metrics, Mapping):
            raise ManifestError(
                f"metrics must be a mapping of name -> number, got {self.metrics!r}"
            )
        for key, value in self.metrics.items():
            if (
                not isinstance(key, str)
                or not isinstance(value, (int, float))
                or isinstance(value, bool)
            ):
                raise ManifestError(f"metrics.{key}: expected a number, got {value!r}")
        object.__setattr__(self, "metrics", dict(self.metrics))

        if self.config is not None:
            config = self.config
            if (
                not isinstance(config, str)
                or not config
                or "\x00" in config
                or "\\" in config
                or PurePosixPath(config).is_absolute()
                or ".." in PurePosixPath(config).parts
            ):
                raise ManifestError(
                    "config must be a relative path inside the repository (no '..'), "
                    f"got {config!r}"
                )
        for key in ("method", "teacher"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ManifestError(f"{key} must be a non-empty string, got {value!r}")


_ENTRY_FIELDS = frozenset(ManifestEntry.__dataclass_fields__)
_REQUIRED_FIELDS = ("name", "urls", "files", "architecture", "num_classes")


def default_manifest_path() -> Path:
    """``$KDZOO_MANIFEST`` if set, else ``checkpoints/manifest.yaml`` at the repository root."""
    env = os.environ.get("KDZOO_MANIFEST")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "checkpoints" / "manifest.yaml"


def read_manifest(path: str | Path | None = None) -> dict[str, ManifestEntry]:
    """Entries of the manifest at ``path`` (default :func:`default_manifest_path`), by name.

    Raises:
        ManifestError: the file is missing or not YAML, or an entry is invalid, duplicated or
            has an unknown field; the message names the file, the entry and the field.
    """
    path = Path(path) if path is not None else default_manifest_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(
            f"checkpoint manifest not found: {path} (set KDZOO_MANIFEST to another manifest file)"
        ) from None
    except OSError as err:
        raise ManifestError(f"cannot read checkpoint manifest {path}: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ManifestError(f"{path} is not valid YAML: {err}") from None

    if not isinstance(data, Mapping) or set(data) != {"checkpoints"}:
        keys = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise ManifestError(
            f"{path}: expected a mapping with the single key 'checkpoints', got {keys}"
        )
    items = data["checkpoints"]
    if items is None:
        items = []
    if not isinstance(items, list):
        raise ManifestError(f"{path}: 'checkpoints' must be a list of entries")

    entries: dict[str, ManifestEntry] = {}
    for index, item in enumerate(items):
        label = f"{path}: checkpoints[{index}]"
        if not isinstance(item, Mapping):
            raise ManifestError(f"{label}: expected a mapping, got {item!r}")
        if isinstance(item.get("name"), str):
            label += f" ({item['name']})"
        unknown = sorted(map(str, set(item) - _ENTRY_FIELDS))
        if unknown:
            hints = [
                f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)
                for key in unknown
                for close in [difflib.get_close_matches(key, _ENTRY_FIELDS, n=1)]
            ]
            raise ManifestError(
                f"{label}: unknown field {', '.join(hints)}; "
                f"allowed: {', '.join(sorted(_ENTRY_FIELDS))}"
            )
        missing = [key for key in _REQUIRED_FIELDS if key not in item]
        if missing:
            raise ManifestError(f"{label}: missing required field {', '.join(missing)}")
        try:
            entry = ManifestEntry(**item)
        except ManifestError as err:
            raise ManifestError(f"{path}: checkpoints[{index}]: {err}") from None
        if entry.name in entries:
            raise ManifestError(f"{label}: duplicate name {entry.name!r} (names must be unique)")
        entries[entry.name] = entry
    return entries


def find(
    name: str, manifest: Mapping[str, ManifestEntry] | str | Path | None = None
) -> ManifestEntry:
    """The entry called ``name`` in ``manifest`` (already read entries, a manifest path, or
    ``None`` for the default manifest); an unknown name raises :class:`ManifestError` listing the
    closest names."""
    if manifest is None or isinstance(manifest, (str, Path)):
        manifest = read_manifest(manifest)
    if name in manifest:
        return manifest[name]
    close = difflib.get_close_matches(str(name), list(manifest), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ManifestError(
        f"no checkpoint named {name!r} in the manifest{hint} (`kdzoo hub list` shows them all)"
    )
