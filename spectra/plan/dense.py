"""Pair base and tuned tensors by name, check shapes, and form ΔW = W_tuned − W_base after upcasting.

Everything that is not analysed comes back as a `Skipped` with its reason; nothing is analysed as raw weights.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

from spectra.errors import CheckpointError
from spectra.io.checkpoint import Checkpoint
from spectra.io.header import TensorEntry
from spectra.names import is_vocabulary, natural_key
from spectra.records import Delta, Options, Skipped

log = logging.getLogger(__name__)

DIFF_CHUNK_BYTES = 4 * 2**20  # ΔW rows formed at a time (read, measured, upcast, subtracted while in cache)
# mantissa bits (with the implicit one) of storage formats whose rounding noise we estimate; f32/f64 count as exact
MANTISSA_BITS = {"bf16": 8, "f16": 11, "f8_e4m3": 4, "f8_e5m2": 3}


@dataclass(frozen=True, slots=True)
class Pair:
    """A tuned tensor and the base tensor it is compared with (same shape, both 2-D floating point)."""

    name: str  # tuned key, verbatim
    base_name: str | None  # None: no base checkpoint (adapters analysed alone)
    shape: tuple[int, int]  # the rows both sides have (a resized vocabulary compares its shared rows)
    note: str | None = None  # what the analysis of this pair leaves out, for Analysis.notes


def pair_tensors(base: Checkpoint, tuned: Checkpoint, options: Options) -> tuple[list[Pair], list[Skipped]]:
    """Match tuned tensors to base tensors; return the analysable pairs and everything skipped, with reasons.

    Identical names pair. When one side carries an extra leading prefix (e.g. `base_model.model.`), the single
    prefix that explains the most unmatched names is stripped, provided the renaming is one-to-one.
    """
    base_of = match_names(set(base.entries), set(tuned.entries))
    skipped = [Skipped(b, "only-in-base") for b in sorted(set(base.entries) - set(base_of.values()), key=natural_key)]
    pairs: list[Pair] = []
    for name in sorted(tuned.entries, key=natural_key):
        entry, base_name = tuned.entries[name], base_of.get(name)
        why = filter_reason(name, options) or _unfit(entry)
        if why is None and base_name is None:
            why = Skipped(name, "only-in-tuned")
        note = None
        if why is None and base_name is not None and base.entries[base_name].shape != entry.shape:
            base_shape = base.entries[base_name].shape
            note = _vocabulary_resized(name, base_shape, entry.shape)
            if note is None:
                why = Skipped(name, "shape-mismatch", f"base {base_shape} vs tuned {entry.shape}")
        if why is not None:
            skipped.append(why)
        else:
            rows = min(entry.shape[0], base.entries[base_name].shape[0]) if base_name is not None else entry.shape[0]
            pairs.append(Pair(name, base_name, (rows, entry.shape[1]), note))
    return pairs, skipped


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


def make_delta(base: Checkpoint, tuned: Checkpoint, pair: Pair, options: Options) -> Delta | Skipped:
    """Read both tensors and return ΔW (upcast first, never subtracted in low precision), or Skipped if ΔW = 0.

    ΔW is float64 for `precision="exact"` or float64 storage, float32 otherwise (exact for bf16/f16 inputs). It is
    formed DIFF_CHUNK_BYTES of rows at a time, read straight from disk into two reused chunk buffers, so memory
    holds ΔW and two small chunks, never a whole stored tensor. The rounding-noise estimate adds both sides'
    Σ ulp²/12 (each stored tensor was rounded once, independently), capped at ‖ΔW‖_F².
    """
    assert pair.base_name is not None
    t_entry, b_entry = tuned.entries[pair.name], base.entries[pair.base_name]
    wide = options.precision == "exact" or "F64" in (t_entry.code, b_entry.code)
    values = torch.empty(pair.shape, dtype=torch.float64 if wide else torch.float32)
    rows, cols = pair.shape
    step = max(1, DIFF_CHUNK_BYTES // max(1, cols * values.element_size()))
    t_buffer = b_buffer = None
    noise = base_energy = delta_energy = 0.0
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        chunk = values[lo:hi]
        w = tuned.read(pair.name, (lo, hi), None if t_buffer is None else t_buffer[: (hi - lo) * cols])
        t_buffer = w.view(-1) if t_buffer is None else t_buffer
        # both sides' storage rounding lands in ΔW (independent errors: their energies add)
        noise += rounding_noise_energy(w, t_entry.dtype_name)
        chunk.copy_(w)
        w = base.read(pair.base_name, (lo, hi), None if b_buffer is None else b_buffer[: (hi - lo) * cols])
        b_buffer = w.view(-1) if b_buffer is None else b_buffer
        noise += rounding_noise_energy(w, b_entry.dtype_name)
        _subtract(chunk, w)
        base_energy += _sum_squares(w)
        delta_energy += float(torch.linalg.vector_norm(chunk)) ** 2
    del t_buffer, b_buffer
    if not math.isfinite(base_energy):
        raise non_finite_error(b_entry, pair.base_name, "base")
    if not math.isfinite(delta_energy) and not bool(torch.isfinite(values).all()):
        raise non_finite_error(t_entry, pair.name, "tuned", int(torch.count_nonzero(~torch.isfinite(values))))
    if delta_energy == 0.0 and not torch.any(values):
        return Skipped(pair.name, "unchanged", "ΔW = 0")
    # An update far below one ulp mostly rounds away; rounding then cannot account for more than all of ‖ΔW‖²
    # (E‖ΔW‖² = ‖Δ‖² + E‖noise‖² for unbiased rounding), so the estimate is capped there.
    noise = min(noise, delta_energy)
    dtype = t_entry.dtype_name
    return Delta(pair.name, pair.shape, values, None, math.sqrt(base_energy), dtype, noise)


def non_finite_error(entry: TensorEntry, name: str, side: str, count: int | None = None) -> CheckpointError:
    """The one-line error for a weight holding NaN or ±Inf, whose ΔW has no spectrum."""
    what = "NaN/Inf values" if count is None else f"{count} NaN/Inf value{'s' if count != 1 else ''}"
    return CheckpointError(
        f"{entry.file}: {side} tensor {name!r} holds {what} (a diverged fine-tune or a damaged file); "
        f"check the checkpoint, or leave the tensor out with --exclude '{re.escape(name)}'"
    )


def rounding_noise_energy(w: torch.Tensor, dtype: str) -> float:
    """Expected ‖noise‖_F² that storing `w` in `dtype` adds to ΔW: Σ ulp(w_ij)²/12 (0 for f32/f64 storage).

    Rounding to nearest leaves an error uniform in ±ulp/2 per element, variance ulp²/12, where
    ulp(w) = 2^(e − p + 1) for |w| in [2^e, 2^(e+1)) and p mantissa bits. For bf16 and f16 the sum is taken over
    a histogram of the stored exponent bits (no float copies of `w`).
    """
    bits = MANTISSA_BITS.get(dtype)
    if bits is None:
        return 0.0
    layout = _EXPONENT_FIELDS.get(dtype)
    if layout is None or w.dtype not in (torch.bfloat16, torch.float16):
        _, exponent = torch.frexp(w.float())  # w = m·2^E with m in [0.5, 1): e = E − 1
        ulp = torch.pow(2.0, (exponent - bits).double())
        ulp = torch.where(w != 0, ulp, 0.0)
        return float(torch.sum(ulp * ulp)) / 12.0
    shift, mask, bias = layout
    raw = w.reshape(-1).view(torch.int16)
    counts = torch.zeros(mask + 1, dtype=torch.float64)
    for i in range(0, raw.numel(), 1 << 20):  # small temporaries, whatever the tensor size
        field = raw[i : i + (1 << 20)] >> shift
        field.bitwise_and_(mask)
        counts += torch.bincount(field, minlength=mask + 1)
    if counts[0] > 0:  # exponent field 0 holds zeros (no noise) and subnormals
        counts[0] -= int(torch.count_nonzero((raw & 0x7FFF) == 0))
    # a normal number with exponent field b has |w| in [2^(b − bias), 2^(b − bias + 1)): ulp = 2^(b − bias − p + 1);
    # subnormals are spaced like b = 1; field `mask` is inf/nan
    b = torch.arange(mask + 1, dtype=torch.float64).clamp_(min=1)
    ulp2 = torch.pow(2.0, 2 * (b - bias - bits + 1))
    ulp2[mask] = 0.0
    return float(torch.sum(counts * ulp2)) / 12.0


def _subtract(values: torch.Tensor, w: torch.Tensor, chunk: int = 1 << 20) -> None:
    """values −= w, upcasting `chunk` elements of w at a time (a mixed-dtype sub_ on the CPU copies all of w)."""
    flat, other = values.view(-1), w.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        flat[i : i + chunk].sub_(other[i : i + chunk].to(values.dtype))


def _sum_squares(w: torch.Tensor, chunk: int = 1 << 16) -> float:
    """Σ w² in float64, upcasting `chunk` elements at a time (no float64 copy of a large tensor)."""
    flat = w.reshape(-1)
    if flat.element_size() == 1:  # float8: torch has no promotion rules for it, so upcast through float32
        flat = flat.float()
    return sum(
        (
            float(torch.linalg.vector_norm(flat[i : i + chunk], dtype=torch.float64)) ** 2
            for i in range(0, flat.numel(), chunk)
        ),
        0.0,
    )


# storage dtype -> (mantissa field width, exponent mask, exponent bias)
_EXPONENT_FIELDS = {"bf16": (7, 0xFF, 127), "f16": (10, 0x1F, 15)}
