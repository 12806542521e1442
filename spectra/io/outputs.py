"""A run's outputs: planned before any compute, staged in temp folders, moved into place together at the end.

    outputs = Outputs(inputs=[base, tuned])
    json_out = outputs.file(json_path, "--json")   # OptionsError now: an input, shared with --html, a folder, ...
    html_out = outputs.file(html_path, "--html")   # None stays None (the output was not asked for)
    with outputs:                                  # SIGINT and SIGTERM raise Interrupted; any failure removes temps
        analysis = analyze(...)
        save_analysis(analysis, outputs.stage(json_out))   # any writer that takes a path
        outputs.write_text(html_out, render_html(analysis))
    outputs.written                                # every output, moved into place together on a clean exit

Planning refuses, before anything runs, an output that resolves to an input file (symlinks followed, hard links
too), one that would replace an existing file inside an input folder (or is such a folder, or contains an input),
two outputs that are the same path (or one inside the other's folder), an output folder inside an input folder,
and a path that exists but is a folder, a FIFO or a device. New files inside an input folder are allowed
(`--json model/analysis.json`).

Writing is all-or-nothing as far as POSIX allows: every output is first written completely under a hidden temp
folder next to it (`.NAME.XXXXXXXX.tmp/NAME`); only when all are complete are they renamed into place, one after
the other, with signals held back; should a rename fail, the ones already made are undone (an old file comes back
from a hard link kept in the temp folder, an old folder from the swap). On any error, Ctrl-C or SIGTERM (turned
into the same Interrupted exception while the block runs), every temp folder and every folder the run created are
removed, and existing outputs are left as they were. Only SIGKILL or a power cut can leave a `.NAME.*.tmp` behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import overload

from spectra.errors import CheckpointError, OptionsError, SpectraError
from spectra.io.files import (
    Interrupted,
    critical,
    exchange,
    fsync_dir,
    interrupts,
    temp_prefix,
)
from spectra.names import ADAPTER_WEIGHTS, INDEX_NAME, printable

__all__ = ["Interrupted", "Outputs", "interrupts"]

PathLike = str | os.PathLike[str]


@dataclass(slots=True)
class _Output:
    target: Path  # absolute, symlinks resolved
    flag: str  # how the user named it ("--json", "-o"), for messages
    label: str  # the path as the user gave it, for messages
    folder: bool
    overwrite: bool
    temp: Path | None = None


@dataclass(slots=True)
class _Inputs:
    """What the inputs occupy: their files (paths and inodes) and their folders (an output may add to, not replace)."""

    files: dict[Path, str] = field(default_factory=dict)  # resolved file -> the input as given
    inodes: dict[tuple[int, int], str] = field(default_factory=dict)
    folders: dict[Path, str] = field(default_factory=dict)  # resolved folder -> the input as given

    def add(self, given: str) -> None:
        path = _locate(given)
        if path is None:
            return  # missing: the loader says so, in its own words
        real = Path(os.path.realpath(path))
        try:
            st = os.stat(real)
        except OSError:
            return
        if stat.S_ISDIR(st.st_mode):
            self._folder(real, given)
            return
        self.files[real] = given
        self.inodes[st.st_dev, st.st_ino] = given
        if real.name in (INDEX_NAME, ADAPTER_WEIGHTS):  # the file of a layout whose other files are its neighbours
            self._folder(real.parent, given)

    def _folder(self, real: Path, given: str) -> None:
        self.folders[real] = given
        if real.parent.name == "snapshots":  # a Hugging Face cache snapshot: its files link into ../../blobs
            self.folders[real.parent.parent / "blobs"] = given

    def problem(self, target: Path, given: Path, folder: bool) -> str | None:
        """Why writing `target` (resolved; `given`: as the user wrote it, made absolute) would damage an input."""
        if (who := self.files.get(target)) is not None:
            return f"is the input {shown(who)}"
        with contextlib.suppress(OSError):
            st = os.stat(target)
            if (who := self.inodes.get((st.st_dev, st.st_ino))) is not None:
                return f"is the same file as the input {shown(who)}"
        for place, exists in ((target, os.path.lexists(target)), (given, os.path.lexists(given))):
            for root, who in self.folders.items():
                if place == root:
                    return f"is the input folder {shown(who)}"
                if exists and place.is_relative_to(root):
                    return f"would replace {shown(place)}, part of the input {shown(who)}"
        if folder:
            for inner, who in (*self.files.items(), *self.folders.items()):
                if inner.is_relative_to(target):
                    return f"would replace a folder holding the input {shown(who)}"
            for root, who in self.folders.items():
                if target.is_relative_to(root):  # a folder of files inside a model folder would be read with it
                    return f"is inside the input folder {shown(who)}"
        return None


def _locate(given: str) -> Path | None:
    """The path an input names: itself, or the snapshot folder of a cached hub id (None when neither exists)."""
    if os.path.lexists(given):
        return Path(given)
    from spectra.io.hub import parse_hub_id, resolve_hub_id

    if parse_hub_id(given) is None:
        return None
    try:
        return resolve_hub_id(given, download=False)
    except CheckpointError:
        return None


class Outputs:
    """The files (and folders) one run writes, planned up front and written all-or-nothing; see the module docstring.

    Args:
        inputs: every file, folder or hub id the run reads (None entries are ignored); outputs may not damage them.

    Use: plan each output with `file` or `folder` (before computing: mistakes fail fast), then inside `with outputs:`
    stage each one (`write_text`, `write_bytes`, or `stage` for a writer that takes a path). A clean exit from the
    block commits (`commit`), an exception aborts (`abort`). `written` lists the outputs once committed.
    """

    def __init__(self, inputs: Iterable[PathLike | None] = ()) -> None:
        self._given = [os.fspath(i) for i in inputs if i is not None]
        self._inputs: _Inputs | None = None
        self._outputs: dict[Path, _Output] = {}
        self._transient: dict[Path, str] = {}  # resolved path -> as given
        self._transient_what: dict[Path, str] = {}
        self._created: list[Path] = []  # folders made for the outputs, outermost first
        self._stack: contextlib.ExitStack | None = None
        self.written: tuple[Path, ...] = ()

    def label(self, target: Path) -> str:
        """Planned output `target` as the user gave it, control characters escaped (for messages)."""
        output = self._outputs.get(target)
        return output.label if output is not None else self._transient.get(target, shown(target))

    @property
    def transients(self) -> tuple[Path, ...]:
        """The transient files planned (a resume journal); they stay on disk when the run fails or is interrupted."""
        return tuple(self._transient)

    # planning

    @overload
    def file(self, path: PathLike, flag: str) -> Path: ...
    @overload
    def file(self, path: None, flag: str) -> None: ...
    def file(self, path: PathLike | None, flag: str) -> Path | None:
        """Plan an output file; returns its resolved path (the key for `write_text`), or None for None.

        Raises:
            OptionsError: the path is an input or part of one, is planned already, is a folder, FIFO or device.
            SpectraError: its folder cannot be written (not a folder, no permission).
        """
        return None if path is None else self._plan(path, flag, folder=False, overwrite=True)

    @overload
    def folder(self, path: PathLike, flag: str, *, overwrite: bool = False) -> Path: ...
    @overload
    def folder(self, path: None, flag: str, *, overwrite: bool = False) -> None: ...
    def folder(self, path: PathLike | None, flag: str, *, overwrite: bool = False) -> Path | None:
        """Plan an output folder (an adapter); an existing non-empty one is replaced only with `overwrite`.

        Raises:
            OptionsError: as `file`; or the folder exists, is not empty, and `overwrite` is False.
            SpectraError: its parent cannot be written.
        """
        return None if path is None else self._plan(path, flag, folder=True, overwrite=overwrite)

    def transient(self, path: PathLike, what: str) -> Path:
        """Plan a file the run keeps while it runs and removes when the outputs are committed (a resume journal): it
        is checked like an output, but never staged, and left in place on failure. Returns the resolved path.

        Raises:
            OptionsError: as `file`.
        """
        target, given = _resolve(path)
        label = shown(path)
        self._check(target, given, what, label, folder=False)
        self._transient[target] = label
        self._transient_what[target] = what
        return target

    def _plan(self, path: PathLike, flag: str, *, folder: bool, overwrite: bool) -> Path:
        target, given = _resolve(path)
        label = shown(path)
        self._check(target, given, flag, label, folder=folder)
        _check_existing(target, f"{flag} {label}", folder=folder, overwrite=overwrite)
        _check_writable(target, label)
        self._outputs[target] = _Output(target, flag, label, folder, overwrite)
        return target

    def _check(self, target: Path, given: Path, flag: str, label: str, *, folder: bool) -> None:
        if self._inputs is None:
            self._inputs = _Inputs()
            for name in self._given:
                self._inputs.add(name)
        if (problem := self._inputs.problem(target, given, folder)) is not None:
            raise OptionsError(f"{flag} {label} {problem}; write the output somewhere else")
        others = [(o.target, f"{o.flag} {o.label}", o.folder) for o in self._outputs.values()]
        others += [(path, f"{self._transient_what[path]} {name}", False) for path, name in self._transient.items()]
        for other, other_name, other_folder in others:
            if other == target:
                raise OptionsError(f"{other_name} and {flag} {label} are the same file; give each its own path")
            if (other_folder and target.is_relative_to(other)) or (folder and other.is_relative_to(target)):
                raise OptionsError(f"{flag} {label} and {other_name}: one is inside the other; give each its own place")

    # staging

    def write_text(self, target: Path | None, text: str) -> None:
        """Write `text` (UTF-8) as the whole content of planned output file `target`, staged now. None does nothing
        (an output that was not asked for).

        Raises:
            SpectraError: the staged file cannot be written (disk full, permissions).
        """
        if target is not None:
            self.write_bytes(target, text.encode("utf-8"))

    def write_bytes(self, target: Path | None, data: bytes) -> None:
        """As `write_text`, for bytes."""
        if target is None:
            return
        staged = self.stage(target)
        try:
            with open(staged, "xb") as fh:
                fh.write(data)
        except OSError as exc:
            raise _cannot_write(self._outputs[target].label, exc) from None

    def stage(self, target: Path) -> Path:
        """Where to write planned output `target` now: a path with `target`'s name inside a new hidden temp folder
        next to it (`.NAME.XXXXXXXX.tmp/NAME`), not yet created. Any writer that takes a path can write it (a file;
        a folder for a planned folder: `AdapterWriter(outputs.stage(folder), ...)`); it is moved to `target` at
        commit. Staging again discards what was staged before.

        Raises:
            SpectraError: the temp folder cannot be created.
            KeyError: `target` was not planned (a bug in the caller).
        """
        output = self._outputs[target]
        with critical():  # created and recorded in one step: an interrupt cannot orphan it
            self._drop_temp(output)
            try:
                self._make_parents(target.parent)
                output.temp = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target), suffix=".tmp"))
            except OSError as exc:
                raise _cannot_write(output.label, exc) from None
        return output.temp / target.name

    def _make_parents(self, folder: Path) -> None:
        missing = []
        while not os.path.lexists(folder):
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir()
            self._created.append(path)

    # committing

    def commit(self) -> tuple[Path, ...]:
        """Move every staged output into place, together; remove transient files; returns (and sets) `written`.

        Raises:
            SpectraError: a rename failed (the renames made are undone, the temps removed).
            ValueError: a planned output was never staged or its writer wrote nothing (a bug in the caller).
        """
        if missing := [o.flag for o in self._outputs.values() if not _staged_ok(o)]:
            self.abort()
            raise ValueError(f"outputs planned but never written: {', '.join(missing)}")
        with critical():
            undo: list[Callable[[], None]] = []
            current = None
            try:
                for current in self._outputs.values():
                    assert current.temp is not None
                    _sync(current.temp / current.target.name)
                    publish = _publish_folder if current.folder else _publish_file
                    publish(current.temp, current.target, undo)
                for folder in {o.target.parent for o in self._outputs.values()}:
                    fsync_dir(folder)
            except OSError as exc:
                for step in reversed(undo):
                    with contextlib.suppress(OSError):
                        step()
                self.abort()
                label = current.label if current is not None else "?"
                raise SpectraError(f"{label}: cannot write ({exc.strerror or exc}); nothing was written") from None
            for output in self._outputs.values():
                self._drop_temp(output)  # the temp folders, holding replaced old files if any
            for path in self._transient:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            self.written = tuple(self._outputs)
            self._created = []
        return self.written

    def abort(self) -> None:
        """Remove every temp folder and the folders made for the outputs; outputs stay as they were. Transient files
        (a resume journal) are kept."""
        with critical():
            for output in self._outputs.values():
                self._drop_temp(output)
            for folder in reversed(self._created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if still empty
            self._created = []

    def _drop_temp(self, output: _Output) -> None:
        if output.temp is not None:
            shutil.rmtree(output.temp, ignore_errors=True)
            output.temp = None

    def __enter__(self) -> Outputs:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(interrupts())
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        try:
            if kind is None:
                self.commit()
            else:
                self.abort()
        finally:
            if stack is not None:
                stack.close()


def shown(path: PathLike) -> str:
    return printable(os.fspath(path))


def kind_of(mode: int) -> str:
    """What a non-regular file is, for messages."""
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def _resolve(path: PathLike) -> tuple[Path, Path]:
    """(the path with every symlink resolved, the path as given made absolute)."""
    given = Path(os.path.abspath(os.fspath(path)))
    return Path(os.path.realpath(given)), given


def _check_existing(target: Path, name: str, *, folder: bool, overwrite: bool) -> None:
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return
    except OSError:
        return  # unreadable: writing will say why
    if folder:
        if not stat.S_ISDIR(st.st_mode):
            raise OptionsError(f"{name}: is {kind_of(st.st_mode)}, not a folder; choose a folder path")
        if not overwrite and _non_empty(target):
            raise OptionsError(f"{name}: exists and is not empty; choose another output folder or pass --overwrite")
        return
    if stat.S_ISDIR(st.st_mode):
        raise OptionsError(f"{name}: is a folder; give a file path")
    if not stat.S_ISREG(st.st_mode):
        raise OptionsError(f"{name}: is {kind_of(st.st_mode)}, not a regular file; give a file path")


def _non_empty(folder: Path) -> bool:
    try:
        return any(folder.iterdir())
    except OSError:
        return True


def _check_writable(target: Path, label: str) -> None:
    """The nearest existing folder above `target` is a folder this process may create files in."""
    folder = target.parent
    while not os.path.lexists(folder):
        folder = folder.parent
    if not folder.is_dir():
        raise SpectraError(f"{label}: cannot write there, {shown(folder)} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpectraError(f"{label}: cannot write in {shown(folder)} (permission denied); choose another path")


def _staged_ok(output: _Output) -> bool:
    if output.temp is None:
        return False
    staged = output.temp / output.target.name
    return staged.is_dir() if output.folder else staged.is_file() and not staged.is_symlink()


def _sync(staged: Path) -> None:
    """fsync a staged file, or every file of a staged folder, and the folders holding them."""
    for folder, _, files in os.walk(staged) if staged.is_dir() else [(str(staged.parent), [], [staged.name])]:
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def _publish_file(temp: Path, target: Path, undo: list[Callable[[], None]]) -> None:
    """Move `temp/NAME` to `target`, keeping a hard link to an old `target` in `temp` to put back on undo."""
    staged, backup = temp / target.name, temp / ".old"
    existed = os.path.lexists(target)
    kept = existed and os.path.isfile(target) and not os.path.islink(target) and _link(target, backup)
    os.replace(staged, target)
    if kept:
        undo.append(lambda: os.replace(backup, target))
    elif not existed:
        undo.append(lambda: target.unlink())


def _publish_folder(temp: Path, target: Path, undo: list[Callable[[], None]]) -> None:
    """Move `temp/NAME` to `target`: over a missing or empty folder, else swapped with the old one (kept in `temp`
    until the end, to put back on undo)."""
    staged = temp / target.name
    if not os.path.lexists(target) or not _non_empty(target):
        existed = os.path.lexists(target)
        os.rename(staged, target)  # replaces an empty folder

        def take_back() -> None:
            os.rename(target, staged)
            if existed:
                target.mkdir()

        undo.append(take_back)
        return
    if exchange(staged, target):  # staged now holds the old folder
        undo.append(lambda: _swap(staged, target))
        return
    old = temp / ".old"
    os.rename(target, old)
    try:
        os.rename(staged, target)
    except OSError:
        os.rename(old, target)
        raise

    def put_back() -> None:
        os.rename(target, staged)
        os.rename(old, target)

    undo.append(put_back)


def _swap(a: Path, b: Path) -> None:
    if not exchange(a, b):
        raise OSError(f"cannot swap {a} and {b} back")


def _link(target: Path, backup: Path) -> bool:
    try:
        os.link(target, backup)
    except OSError:
        return False
    return True


def _cannot_write(label: str, exc: OSError) -> SpectraError:
    return SpectraError(f"{label}: cannot write ({exc.strerror or exc}); check the folder is writable")
