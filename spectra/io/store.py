"""Save an Analysis as JSON and load it back into the same records, losslessly (full spectra included).

The JSON follows the contract in the README, Analysis JSON ("format": "spectra.analysis/1", "layers" with "rank",
"singular_values", ...). Conversion is driven by the records' type hints, so a new field needs no code here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any, TypeVar, Union

import numpy as np

from spectra.errors import SpectraError
from spectra.io.files import write_atomic
from spectra.records import Analysis

FORMAT = "spectra.analysis/1"
SUMMARY_FORMAT = "spectra.summary/1"  # the same keys without singular values, for scripts; not reloadable
T = TypeVar("T")
Decoder = Callable[[dict[str, Any]], object]


def analysis_to_dict(analysis: Analysis) -> dict[str, Any]:
    """Return the JSON-ready dict of `analysis` (contract keys first: format, base, tuned, threshold, layers, ...)."""
    body = _encode(analysis)
    assert isinstance(body, dict)
    return {
        "format": FORMAT,
        "base": body.pop("base"),
        "tuned": body.pop("tuned"),
        "threshold": analysis.options.threshold,
        **body,
    }


def analysis_from_dict(data: dict[str, Any]) -> Analysis:
    """Rebuild an Analysis from `analysis_to_dict` output.

    Raises:
        SpectraError: not a spectra analysis, or an unknown format version.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise SpectraError(f"not a spectra analysis (format {found!r}, expected {FORMAT!r})")
    fields = {f.name for f in dataclasses.fields(Analysis)}
    decoded = _decode(Analysis, {k: v for k, v in data.items() if k in fields})
    assert isinstance(decoded, Analysis)
    return decoded


def summary_to_dict(analysis: Analysis) -> dict[str, Any]:
    """`analysis_to_dict` without the singular values (format "spectra.summary/1"): every scalar, summary and the
    recommendation, a few kB whatever the model size."""
    data = analysis_to_dict(analysis)
    data["format"] = SUMMARY_FORMAT
    for layer in data["layers"]:
        layer.pop("singular_values", None)
    return data


def dumps(analysis: Analysis) -> str:
    return json.dumps(analysis_to_dict(analysis), indent=1, allow_nan=False)


def to_json(analysis: Analysis, *, summary: bool = False) -> str:
    """The JSON text `save_analysis` writes (or, with `summary`, `save_summary`), ending in a newline."""
    data = summary_to_dict(analysis) if summary else analysis_to_dict(analysis)
    return json.dumps(data, indent=1, allow_nan=False) + "\n"


def save_summary(analysis: Analysis, path: str | Path) -> Path:
    """Write `summary_to_dict(analysis)` as JSON to `path` atomically; return the path."""
    return write_atomic(Path(path), to_json(analysis, summary=True))


def save_analysis(analysis: Analysis, path: str | Path) -> Path:
    """Write `analysis` as JSON to `path` atomically (temp file + rename); return the path."""
    return write_atomic(Path(path), dumps(analysis))


def load_analysis(path: str | Path) -> Analysis:
    """Read an analysis JSON written by `save_analysis`.

    Raises:
        SpectraError: missing file, not JSON, or not a spectra analysis.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpectraError(f"{path}: no such file; write one with `spectra rank BASE TUNED --json {path}`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpectraError(f"{path}: not a readable JSON file ({exc})") from None
    try:
        return analysis_from_dict(data)
    except SpectraError as exc:
        raise SpectraError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise SpectraError(f"{path}: damaged spectra analysis ({type(exc).__name__}: {exc})") from None


def _json_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("json", f.name))


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {_json_name(f): _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):  # any number of axes; NaN (a cell with no value) is saved as null
        return _floats(value.tolist())
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, PurePath):  # paths given as Path objects are saved as the str they stand for
        return str(value)
    return value


def _floats(value: Any) -> Any:
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return None if math.isnan(value) else float(value)


def _decode(hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin in (Union, types.UnionType):
        return _decode(next(a for a in args if a is not type(None)), value)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        hints = typing.get_type_hints(hint)
        fields = {_json_name(f): f.name for f in dataclasses.fields(hint)}
        return hint(**{fields[k]: _decode(hints[fields[k]], v) for k, v in value.items() if k in fields})
    if hint is np.ndarray:  # null -> NaN
        return np.asarray(value, dtype=np.float64)
    if origin is tuple:
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        return tuple(_decode(item or args[i], v) for i, v in enumerate(value))
    if origin is dict:
        return {_decode(args[0], k): _decode(args[1], v) for k, v in value.items()}
    if hint in (int, float, str, bool):
        return hint(value)
    return value


# Every saved record type: format string -> decoder. `spectra.analysis/1` is defined here; modules defining other
# record types register theirs on import (spectra/__init__.py imports them), so `load_record` reads all of them.
_DECODERS: dict[str, Decoder] = {FORMAT: analysis_from_dict}


def register_format(fmt: str, decode: Decoder) -> None:
    """Make `load_record` read records whose "format" is `fmt` with `decode` (a dict -> record function)."""
    _DECODERS[fmt] = decode


def record_to_dict(record: object, fmt: str) -> dict[str, Any]:
    """The JSON-ready dict of any frozen record: {"format": fmt, field: value, ...} (arrays as nested lists)."""
    body = _encode(record)
    assert isinstance(body, dict)
    return {"format": fmt, **body}


def record_from_dict(cls: type[T], data: Any, fmt: str) -> T:
    """Rebuild a record of type `cls` from `record_to_dict(record, fmt)` output (unknown keys are ignored).

    Raises:
        SpectraError: `data` is not a record of format `fmt`.
    """
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise SpectraError(f"not a {fmt} record (format {found!r})")
    decoded = _decode(cls, {k: v for k, v in data.items() if k != "format"})
    assert isinstance(decoded, cls)
    return decoded


def write_record(record: object, fmt: str, path: str | Path) -> Path:
    """Write `record` as JSON of format `fmt` to `path` atomically; return the path."""
    return write_atomic(Path(path), json.dumps(record_to_dict(record, fmt), indent=1, allow_nan=False))


def load_record(path: str | Path) -> object:
    """Read any saved spectra record (an analysis, a comparison, a trajectory, ...), dispatching on its "format".

    Raises:
        SpectraError: missing file, not JSON, an unknown format, or a damaged record.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpectraError(f"{path}: no such file; write one with `spectra rank|compare|trajectory … --json`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpectraError(f"{path}: not a readable JSON file ({exc})") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    decode = _DECODERS.get(fmt) if isinstance(fmt, str) else None
    if decode is None:
        known = ", ".join(sorted(_DECODERS))
        raise SpectraError(f"{path}: not a spectra analysis or other spectra record (format {fmt!r}; known: {known})")
    try:
        return decode(data)
    except SpectraError as exc:
        raise SpectraError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SpectraError(f"{path}: damaged {fmt} record ({type(exc).__name__}: {exc})") from None
