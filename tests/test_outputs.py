"""Outputs: planned before compute (inputs and shared paths refused), written all-or-nothing, clean on any signal."""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import spectra.io.files
import spectra.io.outputs
from spectra import OptionsError, SpectraError
from spectra.io.files import Interrupted, critical, interrupts, write_atomic
from spectra.io.outputs import Outputs


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """A file input, a folder input (model.safetensors + config), a sharded folder given by its index."""
    (tmp_path / "in").mkdir()
    file = tmp_path / "in" / "tuned.safetensors"
    file.write_bytes(b"tuned")
    folder = tmp_path / "in" / "base"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"base")
    (folder / "config.json").write_text("{}")
    shards = tmp_path / "in" / "shards"
    shards.mkdir()
    (shards / "model.safetensors.index.json").write_text("{}")
    (shards / "model-00001-of-00001.safetensors").write_bytes(b"shard")
    return {"file": file, "folder": folder, "index": shards / "model.safetensors.index.json", "shards": shards}


@pytest.fixture(autouse=True)
def handlers_restored() -> Iterator[None]:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    assert {s: signal.getsignal(s) for s in before} == before


def planned(inputs: dict[str, Path]) -> Outputs:
    return Outputs([inputs["file"], inputs["folder"], inputs["index"], None])


# ------------------------------------------------------------------------------------------ planning refuses


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        (lambda i: i["file"], "is the input"),
        (lambda i: i["folder"] / "model.safetensors", "would replace"),
        (lambda i: i["folder"] / "config.json", "would replace"),
        (lambda i: i["folder"], "is the input folder"),
        (lambda i: i["index"], "is the input"),
        (lambda i: i["shards"] / "model-00001-of-00001.safetensors", "would replace"),  # a shard of an index input
        (lambda i: i["folder"] / ".." / "base" / "model.safetensors", "would replace"),
    ],
)
def test_an_output_that_is_an_input_or_part_of_one_is_refused(inputs: dict[str, Path], where, fragment: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OptionsError, match=fragment) as caught:
        planned(inputs).file(where(inputs), "--json")
    assert str(caught.value).startswith("--json ") and "\n" not in str(caught.value)


def test_links_to_an_input_are_the_input(inputs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "link.json").symlink_to(inputs["file"])
    os.link(inputs["file"], tmp_path / "hard.json")
    (tmp_path / "dirlink").symlink_to(inputs["folder"])
    outputs = planned(inputs)
    with pytest.raises(OptionsError, match="is the input"):
        outputs.file(tmp_path / "link.json", "--json")
    with pytest.raises(OptionsError, match="same file as the input"):
        outputs.file(tmp_path / "hard.json", "--json")
    with pytest.raises(OptionsError, match="would replace"):
        outputs.file(tmp_path / "dirlink" / "model.safetensors", "--html")


def test_a_new_file_inside_an_input_folder_is_allowed(inputs: dict[str, Path]) -> None:
    outputs = planned(inputs)
    target = outputs.file(inputs["folder"] / "analysis.json", "--json")
    with outputs:
        outputs.write_text(target, "{}")
    assert (inputs["folder"] / "analysis.json").read_text() == "{}"


def test_an_output_folder_holding_an_input_is_refused(inputs: dict[str, Path], tmp_path: Path) -> None:
    outputs = planned(inputs)
    with pytest.raises(OptionsError, match="holding the input"):
        outputs.folder(tmp_path / "in", "-o", overwrite=True)
    with pytest.raises(OptionsError, match="is the input folder"):
        outputs.folder(inputs["folder"], "-o", overwrite=True)
    with pytest.raises(OptionsError, match="inside the input folder"):
        outputs.folder(inputs["folder"] / "adapter", "-o")


def test_a_hub_snapshots_blobs_are_part_of_it(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_bytes(b"weights")
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(repo / "blobs" / "abc123")
    outputs = Outputs([snapshot])
    with pytest.raises(OptionsError, match="would replace"):
        outputs.file(repo / "blobs" / "abc123", "--json")
    with pytest.raises(OptionsError, match="would replace"):
        outputs.file(snapshot / "model.safetensors", "--json")


def test_a_cached_hub_id_is_an_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").write_bytes(b"w")
    monkeypatch.setattr("spectra.io.hub.resolve_hub_id", lambda text, download=False: snapshot)
    with pytest.raises(OptionsError, match="org/name"):
        Outputs(["org/name"]).file(snapshot / "model.safetensors", "--json")


def test_missing_inputs_are_left_to_the_loader(tmp_path: Path) -> None:
    outputs = Outputs([tmp_path / "nope", "not/a-cached-id"])
    assert outputs.file(tmp_path / "a.json", "--json") == tmp_path / "a.json"


@pytest.mark.parametrize("second", ["a.json", "./a.json", "sub/../a.json", "link/a.json"])
def test_two_outputs_sharing_a_path_are_refused_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second: str
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path)
    monkeypatch.chdir(tmp_path)
    outputs = Outputs()
    outputs.file("a.json", "--json")
    with pytest.raises(OptionsError, match=r"--json a.json and --html .* are the same file"):
        outputs.file(second, "--html")


def test_an_output_inside_an_output_folder_is_refused(tmp_path: Path) -> None:
    outputs = Outputs()
    outputs.folder(tmp_path / "adapter", "-o")
    with pytest.raises(OptionsError, match="one is inside the other"):
        outputs.file(tmp_path / "adapter" / "analysis.json", "--json")
    other = Outputs()
    other.file(tmp_path / "adapter" / "analysis.json", "--json")
    with pytest.raises(OptionsError, match="one is inside the other"):
        other.folder(tmp_path / "adapter", "-o")


def test_a_journal_is_checked_like_an_output(tmp_path: Path, inputs: dict[str, Path]) -> None:
    outputs = planned(inputs)
    target = outputs.file(tmp_path / "a.json", "--json")
    with pytest.raises(OptionsError, match="same file"):
        outputs.transient(target, "the resume journal")
    with pytest.raises(OptionsError, match="is the input"):
        outputs.transient(inputs["file"], "the resume journal")


def test_paths_that_are_not_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    outputs = Outputs()
    with pytest.raises(OptionsError, match="FIFO"):
        outputs.file(tmp_path / "fifo", "--json")  # never opened: would block
    with pytest.raises(OptionsError, match="is a folder"):
        outputs.file(tmp_path / "dir", "--html")
    with pytest.raises(OptionsError, match="character device"):
        outputs.file("/dev/null", "--json")  # os.replace would replace the device node itself
    with pytest.raises(OptionsError, match="not a folder"):
        outputs.folder(tmp_path / "fifo", "-o")


def test_a_non_empty_output_folder_needs_overwrite(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "x").write_text("x")
    with pytest.raises(OptionsError, match="--overwrite"):
        Outputs().folder(tmp_path / "adapter", "-o")
    Outputs().folder(tmp_path / "adapter", "-o", overwrite=True)


def test_a_parent_that_is_a_file_fails_before_compute(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpectraError, match="is not a folder"):
        Outputs().file(tmp_path / "f" / "sub" / "a.json", "--json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_folder_fails_before_compute(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        with pytest.raises(SpectraError, match="permission denied"):
            Outputs().file(tmp_path / "ro" / "a.json", "--json")
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_control_characters_in_paths_are_escaped(tmp_path: Path) -> None:
    outputs = Outputs()
    outputs.file(tmp_path / "a\x1b[2J\n.json", "--json")
    with pytest.raises(OptionsError) as caught:
        outputs.file(tmp_path / "a\x1b[2J\n.json", "--html")
    assert "\x1b" not in str(caught.value) and "\n" not in str(caught.value) and "\\x1b" in str(caught.value)


# ------------------------------------------------------------------------------------------ all-or-nothing


def test_outputs_appear_together_with_the_permissions_open_gives(tmp_path: Path) -> None:
    outputs = Outputs()
    a = outputs.file(tmp_path / "a.json", "--json")
    b = outputs.file(tmp_path / "deep" / "er" / "b.html", "--html")
    assert outputs.file(None, "--summary-json") is None
    with outputs:
        outputs.write_text(a, "A")
        outputs.write_bytes(b, b"B")
        outputs.write_text(None, "ignored")
        assert not a.exists() and not b.exists()  # nothing in place before the end
    assert outputs.written == (a, b)
    assert a.read_text() == "A" and b.read_bytes() == b"B"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(a.stat().st_mode) == 0o666 & ~umask
    assert listing(tmp_path) == ["a.json", "deep", "deep/er", "deep/er/b.html"]


def test_a_failure_after_the_first_output_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "b.html").write_text("old")
    outputs = Outputs()
    a = outputs.file(tmp_path / "a.json", "--json")
    outputs.file(tmp_path / "b.html", "--html")
    c = outputs.file(tmp_path / "new" / "folder" / "c.json", "--summary-json")
    with pytest.raises(RuntimeError, match="rendering"), outputs:
        outputs.write_text(a, "A")
        outputs.write_text(c, "C")
        raise RuntimeError("rendering the HTML failed")
    assert listing(tmp_path) == ["b.html"]  # no temp, no folder made for c, the old file as it was
    assert (tmp_path / "b.html").read_text() == "old"
    assert outputs.written == ()


def test_an_output_never_written_is_a_bug(tmp_path: Path) -> None:
    outputs = Outputs()
    a = outputs.file(tmp_path / "a.json", "--json")
    outputs.file(tmp_path / "b.html", "--html")
    with pytest.raises(ValueError, match="--html"), outputs:
        outputs.write_text(a, "A")
    assert listing(tmp_path) == []


def test_a_failed_rename_undoes_the_ones_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "b.html").write_text("old b")
    outputs = Outputs()
    targets = [outputs.file(tmp_path / n, f"--{n}") for n in ("a.json", "b.html", "c.txt")]
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == "c.txt":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SpectraError, match=r"c\.txt: cannot write .*nothing was written"), outputs:
        for target in targets:
            outputs.write_text(target, f"new {target.name}")
    assert listing(tmp_path) == ["b.html"]
    assert (tmp_path / "b.html").read_text() == "old b"  # restored from its hard-linked backup


def test_any_writer_that_takes_a_path_can_fill_a_staged_output(tmp_path: Path) -> None:
    outputs = Outputs()
    a = outputs.file(tmp_path / "a.json", "--json")
    b = outputs.file(tmp_path / "b.json", "--summary-json")
    with outputs:
        staged = outputs.stage(a)
        assert staged.suffix == ".json" and staged.parent.name.startswith(".a.json.")  # the name is kept
        write_atomic(staged, "A")  # a writer with temp files of its own
        outputs.write_text(b, "B")
    assert listing(tmp_path) == ["a.json", "b.json"] and a.read_text() == "A"
    wrong = Outputs()
    c = wrong.file(tmp_path / "c.json", "--json")
    with pytest.raises(ValueError, match="--json"), wrong:
        os.mkdir(wrong.stage(c))  # a writer that made a folder where a file was planned: a bug
    assert listing(tmp_path) == ["a.json", "b.json"]


def test_an_existing_output_is_replaced_and_no_backup_stays(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("old")
    outputs = Outputs()
    a = outputs.file(tmp_path / "a.json", "--json")
    with outputs:
        outputs.write_text(a, "new")
    assert listing(tmp_path) == ["a.json"] and a.read_text() == "new"


def test_a_symlinked_output_is_written_through_the_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "reports").symlink_to(tmp_path / "real")
    outputs = Outputs()
    a = outputs.file(tmp_path / "reports" / "a.json", "--json")
    with outputs:
        outputs.write_text(a, "A")
    assert (tmp_path / "real" / "a.json").read_text() == "A"


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("existing", ["missing", "empty", "full"])
def test_folders_are_staged_and_replace_an_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool, existing: str
) -> None:
    if not exchange:
        monkeypatch.setattr(spectra.io.outputs, "exchange", lambda a, b: False)
    target = tmp_path / "adapter"
    if existing != "missing":
        target.mkdir()
    if existing == "full":
        (target / "old.bin").write_text("old")
    outputs = Outputs()
    folder = outputs.folder(target, "-o", overwrite=True)
    with outputs:
        staged = outputs.stage(folder)
        assert staged.name == "adapter" and staged.parent.parent == tmp_path and not staged.exists()
        staged.mkdir()  # the writer makes it
        (staged / "adapter_config.json").write_text("{}")
    assert listing(tmp_path) == ["adapter", "adapter/adapter_config.json"]


@pytest.mark.parametrize("exchange", [True, False])
def test_a_failed_commit_puts_an_old_folder_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(spectra.io.outputs, "exchange", lambda a, b: False)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "old.bin").write_text("old")
    outputs = Outputs()
    folder = outputs.folder(tmp_path / "adapter", "-o", overwrite=True)
    after = outputs.file(tmp_path / "z.json", "--json")
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(SpectraError, match="nothing was written"), outputs:
        staged = outputs.stage(folder)
        staged.mkdir()
        (staged / "new.bin").write_text("new")
        outputs.write_text(after, "{}")
    monkeypatch.setattr(os, "replace", real_replace)
    assert listing(tmp_path) == ["adapter", "adapter/old.bin"]


def test_an_adapter_writer_fills_a_staged_folder(tmp_path: Path) -> None:
    import torch

    from spectra.peft.config import build_adapter_config
    from spectra.peft.write import AdapterWriter, lora_layout

    module = "model.layers.0.self_attn.q_proj"
    config, _ = build_adapter_config({module: "q_proj"}, {module: 2}, rslora=False, task_type=None, base_model=None)
    outputs = Outputs()
    folder = outputs.folder(tmp_path / "adapter", "-o")
    layout = lora_layout(module, (8, 6), 2)
    with outputs, AdapterWriter(outputs.stage(folder), config, layout, overwrite=True) as writer:
        writer.write_factors(module, torch.ones(8, 2), torch.ones(2, 6))
    assert listing(tmp_path) == ["adapter", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]


def test_transient_files_go_at_commit_and_stay_on_failure(tmp_path: Path) -> None:
    for fail in (True, False):
        outputs = Outputs()
        a = outputs.file(tmp_path / "a.json", "--json")
        journal = outputs.transient(tmp_path / "a.json.journal", "the resume journal")
        journal.write_text("progress")
        with pytest.raises(RuntimeError) if fail else _nothing(), outputs:
            outputs.write_text(a, "A")
            if fail:
                raise RuntimeError("boom")
        assert journal.exists() == fail


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ------------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_writing_leaves_nothing(tmp_path: Path, signum: int) -> None:
    outputs = Outputs()
    a = outputs.file(tmp_path / "a.json", "--json")
    b = outputs.file(tmp_path / "b.html", "--html")
    with pytest.raises(Interrupted) as caught, outputs:
        outputs.write_text(a, "A")
        os.kill(os.getpid(), signum)
        outputs.write_text(b, "B")  # not reached
    assert caught.value.signum == signum and isinstance(caught.value, KeyboardInterrupt)
    assert listing(tmp_path) == [] and outputs.written == ()


def test_a_second_signal_during_cleanup_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = Outputs()
    a = outputs.file(tmp_path / "a.json", "--json")
    real_abort = outputs.abort

    def abort() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while temps are removed
        os.kill(os.getpid(), signal.SIGTERM)
        real_abort()

    monkeypatch.setattr(outputs, "abort", abort)
    with pytest.raises(Interrupted) as caught, outputs:
        outputs.write_text(a, "A")
        os.kill(os.getpid(), signal.SIGINT)
    assert caught.value.signum == signal.SIGINT and listing(tmp_path) == []


def test_a_signal_during_the_renames_waits_for_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = Outputs()
    a, b = outputs.file(tmp_path / "a.json", "--json"), outputs.file(tmp_path / "b.html", "--html")
    real_replace = os.replace
    sent = []

    def replace(src: str | Path, dst: str | Path) -> None:
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Interrupted), outputs:
        outputs.write_text(a, "A")
        outputs.write_text(b, "B")
    assert outputs.written == (a, b)  # the interrupt came after both were in place: the caller can say so
    assert listing(tmp_path) == ["a.json", "b.html"]


def test_interrupts_nest_and_restore_the_handlers() -> None:
    with interrupts():
        inner = signal.getsignal(signal.SIGTERM)
        with interrupts():
            assert signal.getsignal(signal.SIGTERM) is inner
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one: ignored


def test_critical_sections_hold_signals_back() -> None:
    done = []
    with interrupts(), pytest.raises(Interrupted):
        with critical():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("renamed")
        done.append("not reached")
    assert done == ["renamed"]


def test_an_ignored_sigint_stays_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts():
            os.kill(os.getpid(), signal.SIGINT)  # a background job's Ctrl-C: nothing happens
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_nothing_is_installed(tmp_path: Path) -> None:
    import threading

    seen: list[object] = []

    def work() -> None:
        outputs = Outputs()
        a = outputs.file(tmp_path / "a.json", "--json")
        with outputs:
            outputs.write_text(a, "A")
        seen.append(outputs.written)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [(tmp_path / "a.json",)]


# ------------------------------------------------------------------------------------------ write_atomic


def test_write_atomic_leaves_no_temp_on_any_exception(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "o.json").write_text("old")

    def fsync(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(spectra.io.files.os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "o.json", "new")
    assert listing(tmp_path) == ["o.json"] and (tmp_path / "o.json").read_text() == "old"


def test_write_atomic_turns_sigterm_into_cleanup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        os.kill(os.getpid(), signal.SIGTERM)  # would kill the process and orphan .o.json.*.tmp without a handler

    monkeypatch.setattr(spectra.io.files.os, "fsync", fsync)
    with pytest.raises(Interrupted):
        write_atomic(tmp_path / "o.json", "new")
    assert listing(tmp_path) == []


def test_write_atomic_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpectraError, match="cannot write"):
        write_atomic(tmp_path / "f" / "o.json", "x")


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="POSIX signals and renameat2")
