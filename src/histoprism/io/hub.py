"""Files of a Hugging Face hub repository: from the local hub cache, or fetched when allowed.

The package opens no network connection unless the user asks for one (``--allow-download``).
Everything goes through ``huggingface_hub``: its cache (``HF_HOME`` / ``HF_HUB_CACHE``), its
token (``HF_TOKEN`` or ``hf auth login``) and its endpoint (``HF_ENDPOINT``, read at each call,
so a mirror set after import is used too).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from .._core.errors import InputError, first_line

HUB_PREFIX = "hub:"
DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)
MODEL_CARD = "README.md"
_CHUNK = 1 << 20  # bytes read at a time for the sha256


@dataclass(frozen=True)
class HubFile:
    """One file of a model repository: ``repo`` "owner/name", ``filename`` at its top level,
    ``revision`` a branch, tag or commit."""

    repo: str
    filename: str
    revision: str = "main"

    def __post_init__(self) -> None:
        # names, not paths: nothing here may climb out of the cache or the repository
        if not _REPO_ID.match(self.repo) or ".." in self.repo:
            raise InputError(f"'{self.repo}' is not a hub repository id (owner/name)")
        if not _FILE.match(self.filename) or ".." in self.filename:
            raise InputError(f"'{self.filename}' is not a file name of a hub repository")
        if not _REVISION.match(self.revision) or ".." in self.revision:
            raise InputError(f"'{self.revision}' is not a hub revision (branch, tag or commit)")

    def url(self, endpoint: str | None = None) -> str:
        base = (endpoint or hub_endpoint()).rstrip("/")
        return f"{base}/{self.repo}/resolve/{self.revision}/{self.filename}"


@dataclass(frozen=True)
class FetchedFile:
    """A hub file on local disk, and where it came from (written into run configs)."""

    path: Path
    repo: str
    filename: str
    revision: str  # the commit the file was resolved to, when the cache tells it
    sha256: str
    downloaded: bool  # False: found in the hub cache

    def record(self) -> dict:
        """The JSON record of the file's origin (the local path left out)."""
        out = asdict(self)
        del out["path"], out["downloaded"]
        return out


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` if set (a mirror, or a local server in tests), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """``hub:owner/name`` or ``hub:owner/name@revision`` -> (repo, revision or None)."""
    if not ref.startswith(HUB_PREFIX):
        raise InputError(f"'{ref}' is not a hub reference (hub:owner/name[@revision])")
    repo, _, revision = ref[len(HUB_PREFIX) :].partition("@")
    HubFile(repo, "x", revision or "main")  # checks both names
    return repo, revision or None


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(
    file: HubFile, *, allow_download: bool = False, cache_dir: str | Path | None = None
) -> FetchedFile:
    """``file`` from the hub cache, else downloaded if ``allow_download``.

    Without ``allow_download`` nothing is fetched: a file not in the cache is a one-line
    InputError that names the URL it would fetch and how to allow it. ``cache_dir``: the hub
    cache to use (default: huggingface_hub's, ``HF_HUB_CACHE``).
    """
    path, downloaded = cached(file, cache_dir), False
    if path is None:
        if not allow_download:
            raise InputError(
                f"{file.filename} of {file.repo} is not in the hub cache: this would fetch "
                f"{file.url()}; add --allow-download to fetch it (or give a local copy)"
            )
        path, downloaded = _download(file, cache_dir), True
    return FetchedFile(
        path=path,
        repo=file.repo,
        filename=file.filename,
        revision=_commit_of(path) or file.revision,
        sha256=sha256_of(path),
        downloaded=downloaded,
    )


def cached(file: HubFile, cache_dir: str | Path | None = None) -> Path | None:
    """``file`` as the hub cache holds it, or None: reads the disk, never the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        file.repo, file.filename, cache_dir=cache_dir, revision=file.revision
    )
    return Path(found) if isinstance(found, str) else None


def _download(file: HubFile, cache_dir: str | Path | None) -> Path:
    """The package's one network access: reached from ``fetch`` with ``allow_download`` alone."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                file.repo,
                file.filename,
                revision=file.revision,
                cache_dir=cache_dir,
                endpoint=hub_endpoint(),
            )
        )
    except Exception as exc:  # HTTP, DNS, disk, auth: one line naming the URL
        raise InputError(f"cannot fetch {file.url()}: {first_line(exc)}") from None


def _commit_of(path: Path) -> str | None:
    """The commit a cached file belongs to: the hub cache keeps it as ``snapshots/<commit>/``."""
    parent = path.parent
    if parent.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parent.name):
        return parent.name
    return None


def card_licence(repo: str, revision: str, *, allow_download: bool, cache_dir=None) -> str | None:
    """The ``license`` (or ``license_name``) the repository's model card states in its YAML
    front matter; None when the card is not at hand or states none."""
    try:
        card = fetch(
            HubFile(repo, MODEL_CARD, revision), allow_download=allow_download, cache_dir=cache_dir
        )
    except InputError:
        return None
    return licence_of_card(card.path.read_text(encoding="utf-8", errors="replace"))


def licence_of_card(text: str) -> str | None:
    """The licence a model card's YAML front matter states (``license``, or ``license_name``
    when that is ``other``); None if it states none."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return None
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    if not isinstance(meta, dict):
        return None
    licence = meta.get("license")
    if licence == "other" and meta.get("license_name"):
        licence = meta["license_name"]
    return str(licence) if isinstance(licence, str | int) and str(licence).strip() else None


__all__ = [
    "FetchedFile",
    "HubFile",
    "cached",
    "card_licence",
    "fetch",
    "hub_endpoint",
    "licence_of_card",
    "parse_hub_ref",
    "sha256_of",
]
