"""Dense planners: pair tensors by name and check shapes (one base × one or N tuned), or list raw weights.

Everything that is not analysed comes back in the plan as a `Skipped` with its reason. The jobs only name the
tensors; ΔW is formed later, where a job is materialised (spectra.plan.delta).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from spectra.errors import MismatchError
from spectra.io.checkpoint import Checkpoint
from spectra.io.header import TensorEntry
from spectra.names import is_vocabulary, natural_key
from spectra.plan.jobs import Dense, Job, Plan
from spectra.plan.quant import dense_quant, quant_note
from spectra.records import Options, Skipped

log = logging.getLogger(__name__)


def plan_pair(base: Checkpoint, tuned: Checkpoint, options: Options, *, source: int = 0) -> Plan:
    """Match tuned tensors to base tensors; return a job per analysable pair and everything skipped, with reasons.

    Identical names pair. When one side carries an extra leading prefix (e.g. `base_model.model.`), the single
    prefix that explains the most unmatched names is stripped, provided the renaming is one-to-one. A vocabulary
    matrix whose rows were added or removed is compared over the rows both share, with a note. The plan has no
    jobs when nothing pairs (the caller explains why).

    Args:
        base, tuned: open checkpoints (only their headers are used).
        options: include/exclude are applied to the tuned names.
        source: the tuned input's index, stored in every job (multi-input plans).
    """
    base_of = match_names(set(base.entries), set(tuned.entries))
    skipped = [Skipped(b, "only-in-base") for b in sorted(set(base.entries) - set(base_of.values()), key=natural_key)]
    jobs: list[Job] = []
    for name in sorted(tuned.entries, key=natural_key):
        entry, base_name = tuned.entries[name], base_of.get(name)
        why = filter_reason(name, options) or _unfit(entry)
        if why is not None or base_name is None:
            skipped.append(why or Skipped(name, "only-in-tuned"))
            continue
        base_entry, note = base.entries[base_name], None
        if base_entry.shape != entry.shape:
            note = _vocabulary_resized(name, base_entry.shape, entry.shape)
            if note is None:
                skipped.append(Skipped(name, "shape-mismatch", f"base {base_entry.shape} vs tuned {entry.shape}"))
                continue
        rows = min(entry.shape[0], base_entry.shape[0])
        operand = Dense(entry, base_entry, rows, *dense_quant(name, options))
        jobs.append(Job(name, (rows, entry.shape[1]), operand, note, source))
    notes = [job.note for job in jobs if job.note is not None]
    quantized = quant_note([job.operand.base_quant for job in jobs if isinstance(job.operand, Dense)])
    return Plan(tuple(jobs), tuple(skipped), (*notes, *([quantized] if quantized else [])))


def plan_many(base: Checkpoint, tuned: Sequence[Checkpoint], options: Options) -> tuple[Plan, ...]:
    """One plan per tuned checkpoint against the same base (1 × N: `rank BASE T1 T2 …`, trajectories, compare);
    the jobs of plan i carry source = i. Run all their jobs together: the engine orders the same matrix of every
    input next to each other, so each base tensor is read from disk once and from the page cache after that."""
    return tuple(plan_pair(base, t, options, source=i) for i, t in enumerate(tuned))


def plan_weights(checkpoint: Checkpoint, names: Iterable[str] | None = None, *, source: int = 0) -> Plan:
    """A job per raw 2-D floating-point weight W (no base: the matrix is W itself), e.g. for intruder dimensions.

    Args:
        checkpoint: an open checkpoint.
        names: the keys to plan, verbatim; None: every tensor, in natural order.
        source: stored in every job.

    Raises:
        MismatchError: a name is not in the checkpoint.
    """
    keys = sorted(checkpoint.entries, key=natural_key) if names is None else list(names)
    jobs: list[Job] = []
    skipped: list[Skipped] = []
    for name in keys:
        entry = checkpoint.entries.get(name)
        if entry is None:
            raise MismatchError(f"{checkpoint.path}: no tensor {name!r}; check the name (keys are matched verbatim)")
        why = _unfit(entry)
        if why is not None:
            skipped.append(why)
        else:
            jobs.append(Job(name, (entry.shape[0], entry.shape[1]), Dense(entry, None, entry.shape[0]), None, source))
    return Plan(tuple(jobs), tuple(skipped))


def _vocabulary_resized(name: str, base: tuple[int, ...], tuned: tuple[int, ...]) -> str | None:
    """The note for an embedding or output matrix whose vocabulary rows were added or removed (tokens appended by
    `resize_token_embeddings`), or None for any other shape change: ΔW is then formed over the shared rows."""
    if not (is_vocabulary(name) and len(base) == len(tuned) == 2 and base[1] == tuned[1] and base[0] != tuned[0]):
        return None
    shared, change, n = min(base[0], tuned[0]), "added" if tuned[0] > base[0] else "removed", abs(tuned[0] - base[0])
    rest = f"the {change} row has" if n == 1 else f"the {n} {change} rows have"
    return (
        f"{name}: vocabulary resized ({base[0]} → {tuned[0]} rows); ΔW covers the {shared} rows both share, "
        f"{rest} no counterpart (not analysed)"
    )


def filter_reason(name: str, options: Options) -> Skipped | None:
    if options.include is not None and not re.search(options.include, name):
        return Skipped(name, "excluded", f"does not match include {options.include!r}")
    if options.exclude is not None and re.search(options.exclude, name):
        return Skipped(name, "excluded", f"matches exclude {options.exclude!r}")
    return None


def _unfit(entry: TensorEntry) -> Skipped | None:
    if not entry.is_float:
        return Skipped(entry.name, "not-float", f"dtype {entry.dtype_name}")
    if len(entry.shape) != 2:
        return Skipped(entry.name, "not-2d", f"{len(entry.shape)}-D, shape {entry.shape}")
    if 0 in entry.shape:
        return Skipped(entry.name, "not-2d", f"empty matrix, shape {entry.shape}")
    return None


def match_names(base: set[str], tuned: set[str]) -> dict[str, str]:
    """tuned name -> base name: identical names, plus one unambiguous prefix normalisation on either side."""
    matched = {n: n for n in base & tuned}
    only_base, only_tuned = base - tuned, tuned - base
    prefix = _best_prefix(only_tuned, only_base)
    if prefix is not None:  # tuned = prefix + base
        extra = {t: t[len(prefix) :] for t in only_tuned if t.startswith(prefix) and t[len(prefix) :] in only_base}
    elif (prefix := _best_prefix(only_base, only_tuned)) is not None:  # base = prefix + tuned
        extra = {b[len(prefix) :]: b for b in only_base if b.startswith(prefix) and b[len(prefix) :] in only_tuned}
    else:
        return matched
    log.info("normalised name prefix %r for %d tensors", prefix, len(extra))
    return matched | extra


def _best_prefix(longer: set[str], shorter: set[str]) -> str | None:
    """The dotted prefix p with most names in `longer` equal to p + a name in `shorter`; None if none or a tie."""
    votes: Counter[str] = Counter()
    for name in longer:
        for i, char in enumerate(name):
            if char == "." and name[i + 1 :] in shorter:
                votes[name[: i + 1]] += 1
    if not votes:
        return None
    (prefix, n), *rest = votes.most_common(2)
    if rest and rest[0][1] == n:
        log.info("prefix normalisation skipped: %r and %r are equally likely", prefix, rest[0][0])
        return None
    return prefix
