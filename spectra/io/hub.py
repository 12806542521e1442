"""Resolve a Hugging Face hub id (`org/name`, optional `@revision`) to a snapshot folder in the local cache.

Resolution goes through `huggingface_hub` (an optional dependency, imported only when a hub id is given) with
`local_files_only=True`: nothing is downloaded unless the caller asks for it (`Options.download`). When downloading,
only JSON files and the safetensors weights the checkpoint needs are fetched, never pickles.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from spectra.errors import CheckpointError
from spectra.io.header import read_weight_map, stat_path
from spectra.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INDEX_NAME, MODEL_CONFIG, printable

log = logging.getLogger(__name__)

# org/name with hub-legal characters, then an optional @revision (branch, tag or commit)
HUB_ID = re.compile(r"^(?P<repo>[\w][\w.-]*/[\w][\w.-]*)(?:@(?P<revision>[^@\s]+))?$")
# small files that say which weights a checkpoint needs; checked for completeness in the cache
LAYOUT_FILES = [MODEL_CONFIG, INDEX_NAME, ADAPTER_CONFIG]
INSTALL_HINT = "pip install 'spectra-lm[hub]'"


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """Return (repo id, revision or None) if `text` is shaped like `org/name[@revision]`, else None."""
    match = HUB_ID.match(text)
    if match is None or ".." in text or "--" in match["repo"]:
        return None
    return match["repo"], match["revision"]


def hub_cache_dir() -> str | None:
    """The hub cache folder named by HF_HUB_CACHE or HF_HOME now, or None for huggingface_hub's own default.

    huggingface_hub reads these variables once, at import; reading them at call time honours a change made later in
    the same process (tests, notebooks). They are huggingface_hub's settings, not spectra's.
    """
    if cache := os.environ.get("HF_HUB_CACHE"):
        return os.path.expandvars(os.path.expanduser(cache))
    if home := os.environ.get("HF_HOME"):
        return os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")
    return None


def resolve_hub_id(text: str, *, download: bool = False) -> Path:
    """Return the local snapshot folder of hub id `text` (`org/name` or `org/name@revision`).

    Args:
        text: the hub id as the user gave it; must satisfy `parse_hub_id`.
        download: fetch the checkpoint's JSON files and safetensors weights if they are not cached.

    Raises:
        CheckpointError: huggingface_hub is not installed; the id is not in the local cache (and `download` is
            False); the download failed (unknown repo or revision, no network, HF_HUB_OFFLINE set).
    """
    parsed = parse_hub_id(text)
    if parsed is None:
        raise CheckpointError(f"{printable(text)}: not a hub id (org/name or org/name@revision)")
    repo, revision = parsed
    hub = _import_hub(text)
    cache = hub_cache_dir()
    errors = hub.errors
    try:
        folder = _snapshot(hub, repo, revision, cache, LAYOUT_FILES, local=not download)
        if download:
            folder = _snapshot(hub, repo, folder.name, cache, _weights_needed(folder), local=False)
    except errors.LocalEntryNotFoundError as exc:
        raise CheckpointError(_not_cached(text, repo, revision, cache, exc if download else None)) from None
    except (errors.HFValidationError, ValueError) as exc:  # a malformed id or revision
        raise CheckpointError(
            f"{printable(text)}: no such file or folder, and not a valid hub id ({_first_line(exc)})"
        ) from None
    except (errors.HfHubHTTPError, OSError) as exc:  # unknown repo or revision, gated, network
        raise CheckpointError(
            f"{printable(text)}: could not download from the Hugging Face hub: {_first_line(exc)}"
        ) from None
    log.info("hub id %s -> %s", text, folder)
    return folder


def _import_hub(text: str) -> ModuleType:
    try:
        import huggingface_hub
        import huggingface_hub.errors
    except ImportError:
        raise CheckpointError(
            f"{printable(text)}: no such file or folder; to read it as a Hugging Face hub id, install huggingface_hub: "
            f"{INSTALL_HINT}"
        ) from None
    return huggingface_hub


def _snapshot(
    hub: Any, repo: str, revision: str | None, cache: str | None, patterns: list[str], *, local: bool
) -> Path:
    """huggingface_hub.snapshot_download restricted to `patterns` (local: look up refs/ and snapshots/ only)."""
    path = hub.snapshot_download(
        repo, revision=revision, cache_dir=cache, local_files_only=local, allow_patterns=patterns
    )
    return Path(str(path))


def _weights_needed(folder: Path) -> list[str]:
    """The download patterns for the safetensors files a snapshot's layout files call for: an index's shards (each
    validated by `read_weight_map` and matched literally), an adapter, or any.

    Raises:
        CheckpointError: the snapshot's shard index is malformed, or names a pickle or a path outside the snapshot.
    """
    if _present(folder / INDEX_NAME):
        shards = sorted(set(read_weight_map(folder / INDEX_NAME).values()))
        return [INDEX_NAME, *(_literal(shard) for shard in shards)]
    if _present(folder / ADAPTER_CONFIG):
        return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    return ["*.safetensors", "*.json"]


def _present(path: Path) -> bool:
    return stat_path(path) is not None


def _literal(name: str) -> str:
    """An fnmatch pattern matching exactly `name` (a shard named `*` must not fetch the whole repository)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _not_cached(text: str, repo: str, revision: str | None, cache: str | None, exc: Exception | None) -> str:
    where = printable(cache) if cache else "the default cache (HF_HUB_CACHE and HF_HOME unset)"
    rev = f" --revision {printable(revision)}" if revision else ""
    text = printable(text)
    fetch = f"`hf download {repo}{rev}` (older huggingface_hub: `huggingface-cli download {repo}{rev}`)"
    if exc is not None:  # a download was attempted
        return (
            f"{text}: no such file or folder, not in the local Hugging Face cache ({where}), and the download "
            f"failed: {_first_line(exc)}; check the id, the network and HF_HUB_OFFLINE, or fetch it with {fetch}"
        )
    return (
        f"{text}: no such file or folder, and not in the local Hugging Face cache ({where}); fetch it with "
        f"{fetch}, or pass download=True (CLI: --download)"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return printable(text.splitlines()[0]) if text else type(exc).__name__
