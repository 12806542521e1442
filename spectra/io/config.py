"""The config a checkpoint carries beside its weights: config.json of a model, adapter_config.json of an adapter.

Only what spectra shows or uses is kept (ModelConfig): the model's name, architectures and type, and an adapter's
base model and task. A missing, oversized or unreadable file gives None: the analysis never depends on it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from spectra.names import ADAPTER_CONFIG, MODEL_CONFIG
from spectra.records import ModelConfig

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 16 * 2**20


def _read_json(file: Path) -> dict[str, Any] | None:
    try:
        if not file.is_file() or file.stat().st_size > MAX_CONFIG_BYTES:
            return None
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        log.info("%s: not read (%s)", file, type(exc).__name__)
        return None
    return data if isinstance(data, dict) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def read_model_config(location: Path, adapter: bool = False) -> ModelConfig | None:
    """The ModelConfig of the checkpoint at `location` (its file or folder), or None when it has no readable config.

    Args:
        location: the file or folder the checkpoint was read from; the config sits in that folder.
        adapter: read adapter_config.json (base_model_name_or_path, task_type) instead of config.json.
    """
    folder = location if location.is_dir() else location.parent
    data = _read_json(folder / (ADAPTER_CONFIG if adapter else MODEL_CONFIG))
    if data is None:
        return None
    if adapter:
        return ModelConfig(
            name_or_path=_str(data.get("base_model_name_or_path")), task_type=_str(data.get("task_type"))
        )
    architectures = data.get("architectures")
    encoder_decoder = data.get("is_encoder_decoder")
    return ModelConfig(
        name_or_path=_str(data.get("_name_or_path")),
        model_type=_str(data.get("model_type")),
        architectures=tuple(a for a in architectures if isinstance(a, str)) if isinstance(architectures, list) else (),
        is_encoder_decoder=encoder_decoder if isinstance(encoder_decoder, bool) else None,
    )
