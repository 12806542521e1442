"""The user's evaluation of a sweep point: Python callables or a shell command template, a cache of their results,
and the `spectra.sweep/1` codec of the Sweep record.

A shell evaluation is a template with placeholders `{model}` (required: the model to evaluate, in BASE's form),
`{adapter}` (the LoRA adapter folder; empty for the base and the full fine-tune), `{base}` and `{tuned}`, each
substituted shell-quoted. It runs under /bin/sh -c with stdin closed and its output captured; the metric is the
LAST non-empty line of its stdout, parsed as a finite float (anything may be printed before it; stderr is free).
A non-zero exit, a timeout, no output or a last line that is not a number fails that point, with the reason and
the output's last lines.

Cache: one JSON file per (what was evaluated, evaluator key), under $XDG_CACHE_HOME/spectra/sweep by default. A
LoRA point is keyed on its adapter's bytes and the base's identity; the base and the full fine-tune on their
identity (resolved paths, sizes and mtimes of their weight files). Failures are not cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import signal
import string
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from spectra.errors import OptionsError, SpectraError
from spectra.io.files import write_atomic
from spectra.io.store import record_from_dict, record_to_dict, register_format, write_record
from spectra.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, printable
from spectra.records import Sweep

FORMAT: Final = "spectra.sweep/1"
CACHE_FORMAT: Final = "spectra.sweep-cache/1"
PLACEHOLDERS: Final = ("model", "adapter", "base", "tuned")
TAIL_LINES: Final = 20


class EvaluationError(SpectraError):
    """An evaluation failed (the sweep records it on the point and goes on); `output` holds its last lines."""

    def __init__(self, message: str, output: str | None = None) -> None:
        super().__init__(message)
        self.output = output


@dataclass(frozen=True, slots=True)
class Candidate:
    """What an evaluator is given: the model to evaluate, and where it came from."""

    label: str  # the point: "base", "full fine-tune", "r=4", ...
    model: Path  # the merged model (BASE's form: a .safetensors file or a folder), BASE or TUNED
    adapter: Path | None  # the LoRA adapter folder (None for the base and the full fine-tune)
    base: Path
    tuned: Path


@dataclass(frozen=True, slots=True)
class Evaluator:
    """A task evaluation: `function(candidate)` returns the metric (a finite float) or raises.

    Attributes:
        name: shown in tables and saved in the record (the command, for a shell evaluation).
        function: the evaluation; an exception fails the point it evaluates (the sweep goes on).
        key: identifies the evaluation for the cache (same key, same results); None: never cached.
    """

    name: str
    function: Callable[[Candidate], float] = field(compare=False, repr=False)
    key: str | None = None

    def __post_init__(self) -> None:
        if not callable(self.function):
            raise OptionsError(f"an evaluator needs a callable, got {type(self.function).__name__}")

    @classmethod
    def of(cls, evaluate: Evaluator | Callable[[Path], float]) -> Evaluator:
        """`evaluate` itself, or a callable of the model path wrapped (named after it, not cached).

        Raises:
            OptionsError: `evaluate` is not callable.
        """
        if isinstance(evaluate, Evaluator):
            return evaluate
        if not callable(evaluate):
            raise OptionsError(f"evaluate must be a callable of the model path or an Evaluator, got {evaluate!r}")
        name = getattr(evaluate, "__qualname__", None) or type(evaluate).__name__
        return cls(str(name), lambda c: evaluate(c.model), None)

    def __call__(self, candidate: Candidate) -> float:
        """The metric of `candidate`.

        Raises:
            EvaluationError: the evaluation raised, or returned something that is not a finite number.
        """
        try:
            value = self.function(candidate)
        except EvaluationError:
            raise
        except Exception as exc:  # the user's code: any failure fails this point only
            raise EvaluationError(f"{candidate.label}: {self.name} raised {type(exc).__name__}: {exc}") from exc
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EvaluationError(f"{candidate.label}: {self.name} returned {value!r}, not a finite number")
        return float(value) + 0.0  # -0.0 prints as "-0"


def check_template(template: str) -> None:
    """Refuse a template without {model} or with another placeholder than PLACEHOLDERS.

    Raises:
        OptionsError: saying which placeholder, and that literal braces are written {{ and }}.
    """
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise OptionsError(f"--eval {template!r}: {exc}; write literal braces as {{{{ and }}}}") from None
    known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    for name, spec, conv in fields:
        if name not in PLACEHOLDERS or spec or conv:
            shown = "{" + name + ("!" + conv if conv else "") + (":" + spec if spec else "") + "}"
            raise OptionsError(
                f"--eval {template!r}: unknown placeholder {shown}; the placeholders are {known} "
                "(write literal braces as {{ and }}, e.g. ${{HOME}})"
            )
    if "model" not in {name for name, _, _ in fields}:
        raise OptionsError(f"--eval {template!r}: no {{model}} placeholder; the command must be told what to evaluate")


def fill_template(template: str, candidate: Candidate) -> str:
    """The command line for `candidate`: each placeholder replaced by its path, shell-quoted."""
    values = {
        "model": candidate.model,
        "adapter": "" if candidate.adapter is None else candidate.adapter,
        "base": candidate.base,
        "tuned": candidate.tuned,
    }
    return template.format(**{k: shlex.quote(str(v)) for k, v in values.items()})


def shell_evaluator(template: str, timeout: float | None = None, *, name: str | None = None) -> Evaluator:
    """An Evaluator that runs the shell command `template` (see the module docstring) and reads its last line.

    Args:
        template: the command with {model} (required), {adapter}, {base}, {tuned}.
        timeout: seconds after which the command (its whole process group) is killed and the point fails.
        name: shown in tables; default: the template.

    Raises:
        OptionsError: an unknown placeholder, no {model}, or a timeout ≤ 0.
    """
    check_template(template)
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise OptionsError(f"timeout must be a positive number of seconds, got {timeout}")
    key = hashlib.sha256(json.dumps(["shell", template, timeout]).encode()).hexdigest()
    return Evaluator(name or template, lambda c: run_command(fill_template(template, c), c.label, timeout), key)


def run_command(command: str, label: str, timeout: float | None) -> float:
    """Run `command` under /bin/sh -c and return the number on the last non-empty line of its stdout.

    Raises:
        EvaluationError: it exited non-zero, timed out, printed nothing, or its last line is not a finite number.
    """
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: a timeout kills the children it started too
    )
    try:
        out_b, err_b = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out_b, err_b = proc.communicate()
        tail = output_tail(out_b, err_b)
        why = f"{label}: the evaluation did not finish within {timeout:g} s (killed): {command}"
        raise EvaluationError(why, tail) from None
    except BaseException:  # an interrupt: leave no evaluation running
        _kill_group(proc)
        proc.wait()
        raise
    out, tail = out_b.decode("utf-8", "replace"), output_tail(out_b, err_b)
    if proc.returncode != 0:
        raise EvaluationError(f"{label}: the evaluation exited with status {proc.returncode}: {command}", tail)
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    if not lines:
        raise EvaluationError(
            f"{label}: the evaluation printed nothing on stdout; its last line must be the metric: {command}", tail
        )
    try:
        value = float(lines[-1]) + 0.0
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise EvaluationError(
            f"{label}: the last line of the evaluation's stdout is not a finite number "
            f"({printable(lines[-1][:80])!r}); print the metric alone on the last line: {command}",
            tail,
        )
    return value


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def output_tail(stdout: bytes, stderr: bytes, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of stdout and of stderr, headed, control characters escaped."""
    parts = []
    for head, data in (("stdout", stdout), ("stderr", stderr)):
        text = [printable(t) for t in data.decode("utf-8", "replace").splitlines()][-lines:]
        if text:
            parts.append(f"--- {head} (last {len(text)} lines) ---\n" + "\n".join(text))
    return "\n".join(parts) if parts else "(no output)"


# the cache


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/spectra/sweep, or ~/.cache/spectra/sweep."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spectra" / "sweep"


def _digest(parts: Iterable[bytes | str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def checkpoint_identity(files: Iterable[Path]) -> str:
    """The identity of a checkpoint: each weight file's resolved path, size and mtime (not its bytes: 14 GB)."""
    parts = []
    for path in sorted({Path(os.path.realpath(f)) for f in files}):
        st = os.stat(path)
        parts.append(f"{path}\0{st.st_size}\0{st.st_mtime_ns}")
    return _digest(parts)


def adapter_identity(adapter: Path) -> str:
    """The digest of an adapter's adapter_model.safetensors and adapter_config.json bytes."""
    h = hashlib.sha256()
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        with open(adapter / name, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
        h.update(b"\0" + name.encode())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class EvalCache:
    """Metrics by key, one JSON file each under `folder`; `folder` None: nothing is cached."""

    folder: Path | None

    def key(self, evaluator: Evaluator, *what: str) -> str | None:
        """The entry's key for `evaluator` on `what` (identities); None when the evaluator is not cacheable."""
        if self.folder is None or evaluator.key is None:
            return None
        return _digest([CACHE_FORMAT, evaluator.key, *what])

    def get(self, key: str | None) -> float | None:
        """The cached metric, or None (no entry, or one that cannot be read: then it is evaluated again)."""
        if key is None or self.folder is None:
            return None
        try:
            data = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
            value = data["metric"] if data.get("format") == CACHE_FORMAT and data.get("key") == key else None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def put(self, key: str | None, value: float, name: str, label: str) -> None:
        """Store a metric (silently skipped when the cache folder cannot be written: the cache is an optimisation)."""
        if key is None or self.folder is None:
            return
        entry = {"format": CACHE_FORMAT, "key": key, "metric": value, "evaluator": name, "point": label}
        entry["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.folder / f"{key}.json", json.dumps(entry, indent=1) + "\n")
        except (OSError, SpectraError):
            pass


# the record's codec


def sweep_to_dict(record: Sweep) -> dict[str, Any]:
    """The JSON-ready dict of a Sweep (format "spectra.sweep/1")."""
    return record_to_dict(record, FORMAT)


def sweep_from_dict(data: dict[str, Any]) -> Sweep:
    """Rebuild a Sweep from `sweep_to_dict` output.

    Raises:
        SpectraError: not a spectra.sweep/1 record.
    """
    return record_from_dict(Sweep, data, FORMAT)


def sweep_json(record: Sweep) -> str:
    """The record as `spectra.sweep/1` JSON text (what sweep.json holds)."""
    return json.dumps(sweep_to_dict(record), indent=1, allow_nan=False) + "\n"


def save_sweep(record: Sweep, path: str | os.PathLike[str]) -> Path:
    """Write the record as `spectra.sweep/1` JSON to `path` atomically; `spectra.load_record(path)` reads it back.

    Raises:
        SpectraError: the file cannot be written.
    """
    return write_record(record, FORMAT, Path(path))


register_format(FORMAT, sweep_from_dict)
