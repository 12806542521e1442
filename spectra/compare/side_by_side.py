"""analyze_side_by_side(): `rank BASE T1 T2 …` — one analysis per tuned input against the same base, labelled."""

from __future__ import annotations

import os
from collections.abc import Sequence

from spectra.compare.records import SideBySide, default_label, unique_labels
from spectra.engine.executor import ProgressHook, identity
from spectra.errors import OptionsError
from spectra.pipeline import analyze_many
from spectra.records import Options

PathLike = str | os.PathLike[str]


def analyze_side_by_side(
    base: PathLike | None,
    tuned: Sequence[PathLike],
    options: Options | None = None,
    *,
    labels: Sequence[str] | None = None,
    progress: ProgressHook = identity,
) -> SideBySide:
    """Return the analyses of every tuned input against `base` (one stream: each base tensor read once), labelled.

    Args:
        base: as for `analyze`; None only when every tuned input is a PEFT adapter.
        tuned: two or more fine-tunes (dense checkpoints or adapters).
        options: as for `analyze`.
        labels: one per tuned input; default from the paths (repeats numbered).
        progress: as for `analyze_many`.

    Raises:
        OptionsError: fewer than two tuned inputs, or labels of another number than the inputs.
        CheckpointError, MismatchError: as for `analyze`.
    """
    if len(tuned) < 2:
        raise OptionsError(f"a side-by-side analysis takes at least two tuned inputs, got {len(tuned)}")
    if labels is not None and len(labels) != len(tuned):
        raise OptionsError(f"{len(labels)} labels for {len(tuned)} tuned inputs; give one --label per input")
    names = unique_labels([default_label(os.fspath(t)) for t in tuned] if labels is None else [str(x) for x in labels])
    return SideBySide(names, analyze_many(base, tuned, options, progress=progress))
