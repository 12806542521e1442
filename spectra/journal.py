"""A resume journal: the matrices a run has completed, one JSON line each, so a run that dies resumes where it stopped.

The file (conventionally next to the run's output: `out.json.journal`, see `journal_path`) starts with a header line
naming what the results depend on: the spectra version, the kernel, the resolved device, every tensor file read
(resolved path, size, mtime, a hash of its safetensors header) and a digest of the plan (every job's name, shape and
tensor byte ranges). Each completed matrix then appends one line: its Spectrum (σ as a list of floats; float64
round-trips exactly through JSON's shortest repr) or its Skipped record. Never pickle.

A re-run of the same command with the same journal takes the journaled matrices as they are and computes only
the rest; analyses therefore equal an uninterrupted run's. A journal whose header differs (other inputs, changed
files, other options that change the spectra) is ignored with a note and replaced; settings that only change the
metrics (threshold, LoRA ranks) reuse it. A torn last line (a kill mid-write) is dropped. The caller removes the
journal once the run's outputs are written (`Journal.remove`, or `Outputs.transient` does it at commit).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from spectra.errors import OptionsError, SpectraError
from spectra.names import printable
from spectra.records import QuantProbe, Skipped, Spectrum

if TYPE_CHECKING:
    from spectra.plan.jobs import Job

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "Journal", "journal_path", "run_key"]

FORMAT = "spectra.journal/1"
SYNC_EVERY_S = 1.0  # fsync at most this often: a kill loses nothing flushed, a power cut at most a second
HEADER_LIMIT = 100 << 20  # safetensors' own cap on a header
Result = Spectrum | Skipped
JobKey = tuple[int, str]


def journal_path(output: str | os.PathLike[str]) -> Path:
    """The journal kept for an output file: `out.json` -> `out.json.journal`, in the same folder."""
    path = Path(output)
    return path.with_name(path.name + ".journal")


def run_key(jobs: Sequence[Job], *, kernel: str, device: str, version: str) -> dict[str, Any]:
    """What the results of `jobs` depend on, as JSON: version, kernel, device, tensor files and a plan digest.

    Args:
        jobs: the run's jobs (their operands name the tensor files and byte ranges).
        kernel: the kernel's repr, e.g. "Values(precision='fast')".
        device: the resolved device, e.g. "cpu" or "cuda".
        version: spectra's version.
    """
    plan = hashlib.sha256()
    files: set[Path] = set()
    for job in jobs:
        entries = [e for e in _entries(job.operand) if e is not None]
        files.update(e.file for e in entries)
        operand = {k: v for k, v in _fields(job.operand).items() if not hasattr(v, "file")}
        plan.update(
            json.dumps(
                [job.source, job.name, list(job.shape), repr(operand)]
                + [[os.fspath(e.file), e.start, e.nbytes, e.code, list(e.shape)] for e in entries]
            ).encode("utf-8", "surrogatepass")
        )
    return {
        "version": version,
        "kernel": kernel,
        "device": device,
        "files": {os.path.realpath(f): _file_identity(f) for f in sorted(files)},
        "plan": plan.hexdigest(),
        "jobs": len(jobs),
    }


def _fields(operand: object) -> dict[str, Any]:
    return {name: getattr(operand, name) for name in getattr(operand, "__slots__", ())}


def _entries(operand: object) -> list[Any]:
    return [v for v in _fields(operand).values() if v is None or hasattr(v, "file")]


def _file_identity(file: Path) -> list[Any]:
    """[size, mtime_ns, sha256 of the safetensors header] of one tensor file."""
    st = os.stat(file)
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        digest.update(head + fh.read(min(n, HEADER_LIMIT)))
    return [st.st_size, st.st_mtime_ns, digest.hexdigest()]


class Journal:
    """The completed matrices of one run, kept in `path` as they stream from the engine (see the module docstring).

    Args:
        path: the journal file (`journal_path(output)`).
        resume: None: use a matching journal if there is one (the default); True: there must be one (OptionsError
            otherwise); False: start afresh, discarding any.
        notify: called with one line when a journal is resumed or ignored (the CLI prints it on stderr).

    After `stream`, `resumed` is the number of matrices taken from the journal and `note` says why an existing
    journal was ignored (None if none was).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, resume: bool | None = None, notify: Callable[[str], None] | None = None
    ) -> None:
        self.path = Path(path)
        self.resume = resume
        self.notify = notify or (lambda line: log.info("%s", line))
        self.resumed = 0
        self.note: str | None = None
        self._fh: IO[bytes] | None = None
        self._synced = 0.0
        self._records = 0  # appended by this run
        self._created: list[Path] = []  # folders made for the journal, outermost first

    @staticmethod
    def completed(path: str | os.PathLike[str]) -> int:
        """How many matrices journal `path` holds (0 when there is none, or it is not a journal), for messages."""
        try:
            with open(path, "rb") as fh:
                if not fh.readline().startswith(_line({"format": FORMAT})[:-2]):
                    return 0
                return sum(1 for line in fh if line.endswith(b"\n"))
        except OSError:
            return 0

    def stream(
        self,
        jobs: Sequence[Job],
        key: Mapping[str, Any],
        compute: Callable[[Sequence[Job]], Iterable[tuple[Job, Result]]],
    ) -> Generator[tuple[Job, Result], None, None]:
        """(job, result) for every job: journaled ones first, as journaled, then `compute(the rest)`, each recorded
        as it arrives. The journal stays on disk when the stream ends, stops early or fails.

        Raises:
            OptionsError: `resume` is True and there is no matching journal; another run holds the journal.
            SpectraError: the journal cannot be written.
        """
        if self.resume and not self.path.is_file():
            raise OptionsError(
                f"--resume: there is no journal {printable(str(self.path))} to resume from; run without --resume"
            )
        done = self._open(dict(key), jobs)
        try:
            rest = []
            for job in jobs:
                if (result := done.get((job.source, job.name))) is not None:
                    yield job, result
                else:
                    rest.append(job)
            for job, result in compute(rest):
                self._append(_record(job, result))
                yield job, result
        finally:
            self.close()

    def _open(self, key: dict[str, Any], jobs: Sequence[Job]) -> dict[JobKey, Result]:
        header = {"format": FORMAT, "key": key}
        expected = {(job.source, job.name): job.shape for job in jobs}
        try:
            self._make_parents()
            fh = open(self.path, "a+b")  # noqa: SIM115 - held open for the run
        except OSError as exc:
            raise self._error(exc) from None
        try:
            _lock(fh, self.path)
            done, good_end, why = ({}, 0, None) if self.resume is False else _read(fh, header, expected)
            if self.resume and why is not None:
                raise OptionsError(
                    f"--resume: the journal {printable(str(self.path))} {why}; run without --resume to start afresh"
                )
            if why is not None and why != "is empty":
                self.note = f"ignored the journal {printable(str(self.path))}: it {why}; starting afresh"
                self.notify(self.note)
            fh.truncate(good_end)
            fh.seek(good_end)
            if good_end == 0:
                fh.write(_line(header))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            fh.close()
            raise self._error(exc) from None
        except BaseException:
            fh.close()
            raise
        self._fh = fh
        self.resumed = len(done)
        if done:
            self.notify(
                f"resuming: {len(done)} of {len(jobs)} matrices from {printable(str(self.path))}, "
                f"computing the other {len(jobs) - len(done)}"
            )
        return done

    def _append(self, line: bytes) -> None:
        if self._fh is None:
            raise ValueError("the journal is closed")
        try:
            self._fh.write(line)
            self._fh.flush()
            self._records += 1
            if time.monotonic() - self._synced > SYNC_EVERY_S:
                os.fsync(self._fh.fileno())
                self._synced = time.monotonic()
        except OSError as exc:
            raise self._error(exc) from None

    def close(self) -> None:
        """Flush and close the file; it stays on disk if it holds any matrix (else it is removed, with the folders
        made for it: a run that failed before completing one leaves nothing)."""
        if self._fh is None:
            return
        empty = self._records == 0 and self.resumed == 0
        with contextlib.suppress(OSError):
            self._fh.flush()
            if not empty:
                os.fsync(self._fh.fileno())
        if empty:
            self.path.unlink(missing_ok=True)  # before closing: the lock still keeps other runs out
        self._fh.close()
        self._fh = None
        if empty:
            for folder in reversed(self._created):
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def _make_parents(self) -> None:
        missing, folder = [], self.path.parent
        while not os.path.lexists(folder):
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir()
            self._created.append(path)

    def remove(self) -> None:
        """Delete the journal (the run's outputs are written)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def _error(self, exc: OSError) -> SpectraError:
        return SpectraError(
            f"{printable(str(self.path))}: cannot write the resume journal ({exc.strerror or exc}); check the folder"
        )


def _lock(fh: IO[bytes], path: Path) -> None:
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OptionsError(
                f"{printable(str(path))}: another spectra run is writing this journal; wait for it or choose "
                "another output"
            ) from None
        # a file system without locks: go on unlocked


def _line(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"


def _read(
    fh: IO[bytes], header: dict[str, Any], expected: dict[JobKey, tuple[int, int]]
) -> tuple[dict[JobKey, Result], int, str | None]:
    """(results read, byte offset after the last good line, why the journal cannot be used or None)."""
    fh.seek(0)
    first = fh.readline()
    if not first:
        return {}, 0, "is empty"
    if _parse(first) != header:
        found = _parse(first)
        ok = isinstance(found, dict) and found.get("format") == FORMAT
        what = _difference(found["key"], header["key"]) if ok and isinstance(found.get("key"), dict) else None
        return {}, 0, f"was written for {what}" if what else "is not a journal of this run"
    done: dict[JobKey, Result] = {}
    end = fh.tell()
    for line in fh:
        if not line.endswith(b"\n"):
            break  # torn by a kill mid-write
        entry = _decode(_parse(line), expected)
        if entry is None:
            break
        done[entry[0]] = entry[1]
        end = fh.tell()
    return done, end, None


def _difference(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    """What differs between two run keys, in the user's words."""
    if found.get("files") != wanted.get("files"):
        return "other input files (or they changed since)"
    words = {
        "plan": "other tensors (inputs, --include/--exclude)",
        "kernel": "another --precision",
        "device": "another device",
        "version": "another spectra version",
    }
    differing = [words.get(k, k) for k in wanted if found.get(k) != wanted[k]]
    return ", ".join(differing) or "another run"


def _parse(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _record(job: Job, result: Result) -> bytes:
    if isinstance(result, Skipped):
        body: dict[str, Any] = {"skipped": {"name": result.name, "reason": result.reason, "detail": result.detail}}
    else:
        body = {
            "spectrum": {
                "name": result.name,
                "shape": list(result.shape),
                "s": [float(x) for x in np.asarray(result.s, dtype=np.float64).tolist()],
                "energy": float(result.energy),
                "base_norm": None if result.base_norm is None else float(result.base_norm),
                "dtype": result.dtype,
                "noise_energy": float(result.noise_energy),
                "method": result.method,
                "quant": None
                if result.quant is None
                else {
                    "kind": result.quant.kind,
                    "coefficient": float(result.quant.coefficient),
                    "energy": float(result.quant.energy),
                },
            }
        }
    return _line({"source": job.source, "name": job.name, **body})


def _decode(entry: Any, expected: dict[JobKey, tuple[int, int]]) -> tuple[JobKey, Result] | None:
    """The (job key, result) of one journal line, or None when it does not describe a planned job exactly."""
    if not isinstance(entry, dict):
        return None
    source, name = entry.get("source"), entry.get("name")
    if type(source) is not int or not isinstance(name, str):
        return None
    key = (source, name)
    if key not in expected:
        return None
    try:
        if isinstance(skipped := entry.get("skipped"), dict):
            fields = (skipped["name"], skipped["reason"], skipped["detail"])
            return (key, Skipped(*fields)) if all(isinstance(f, str) for f in fields) and fields[0] == name else None
        spectrum = entry["spectrum"]
        s = spectrum["s"]
        shape = tuple(spectrum["shape"])
        base_norm = spectrum["base_norm"]
        numbers = (spectrum["energy"], spectrum["noise_energy"], 0.0 if base_norm is None else base_norm)
        if (
            shape != expected[key]
            or spectrum["name"] != name
            or not isinstance(s, list)
            or len(s) > min(shape)
            or not all(type(x) is float and math.isfinite(x) for x in s)
            or not all(type(x) in (float, int) for x in numbers)
            or not isinstance(spectrum["dtype"], str)
            or not isinstance(spectrum["method"], str)
        ):
            return None
        return key, Spectrum(
            name=name,
            shape=(int(shape[0]), int(shape[1])),
            s=np.asarray(s, dtype=np.float64),
            energy=float(spectrum["energy"]),
            base_norm=None if base_norm is None else float(base_norm),
            dtype=spectrum["dtype"],
            noise_energy=float(spectrum["noise_energy"]),
            method=spectrum["method"],
            quant=_quant_probe(spectrum.get("quant")),
        )
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def _quant_probe(entry: Any) -> QuantProbe | None:
    """A journaled QuantProbe (the QLoRA detection of plan/quant.py), or None; a malformed one raises ValueError."""
    if entry is None:
        return None
    kind, coefficient, energy = entry["kind"], entry["coefficient"], entry["energy"]
    if not (isinstance(kind, str) and all(type(x) in (float, int) and math.isfinite(x) for x in (coefficient, energy))):
        raise ValueError("malformed quant probe")
    return QuantProbe(kind, float(coefficient), float(energy))
