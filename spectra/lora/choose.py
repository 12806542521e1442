"""The sweep's decisions: which uniform rungs to evaluate (the ladder, below break-even), the gain of a point, and
the choice of the smallest LoRA keeping all but a tolerance of the full fine-tune's gain. numpy-free, torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

from spectra.records import DEFAULT_SWEEP_RANKS, EXTRACTED_KINDS, SweepPoint, SweepSettings


def ladder(shapes: Sequence[tuple[int, int]], given: tuple[int, ...] | None) -> tuple[list[int], list[str]]:
    """(the uniform rungs, notes): `given`, or DEFAULT_SWEEP_RANKS without the rungs at which every module of
    `shapes` reaches break-even (r·(m + n) ≥ m·n: no LoRA is for that)."""
    notes: list[str] = []

    def useful(r: int) -> bool:
        return any(r * (m + n) < m * n for m, n in shapes)

    if given is not None:
        above = [r for r in given if not useful(r)]
        if above:
            notes.append(
                f"ranks {', '.join(map(str, above))} reach break-even (r·(m + n) ≥ m·n) for every targeted "
                "module: evaluated, but never chosen (such a LoRA costs at least the dense matrices)"
            )
        return list(given), notes
    ranks = [r for r in DEFAULT_SWEEP_RANKS if useful(r)] or [1]
    if dropped := [r for r in DEFAULT_SWEEP_RANKS if r not in ranks]:
        notes.append(
            f"default rungs {', '.join(map(str, dropped))} left out: at those ranks every targeted module's "
            "LoRA would cost at least its dense matrix (r·(m + n) ≥ m·n), which no LoRA is for"
        )
    return ranks, notes


def gain_of(value: float | None, refs: Sequence[float | None]) -> float | None:
    """(value − base) / (full − base); None when a value is missing or the references are equal."""
    base, full = refs
    if value is None or base is None or full is None or full == base:
        return None
    return (value - base) / (full - base)


def choose(points: Sequence[SweepPoint], settings: SweepSettings, selecting: bool) -> tuple[str | None, str]:
    """(the label of the smallest LoRA point keeping 1 − tolerance of the gain, below break-even; or None) and the
    one-sentence reason, with the numbers. Equal sizes: the larger gain (to 1e-4), then the earlier point."""
    on = "the selection metric" if selecting else "the metric"

    def value(p: SweepPoint) -> float | None:
        return p.select_metric if selecting else p.metric

    mb, mf = value(points[0]), value(points[1])
    assert mb is not None and mf is not None  # a failed reference ends the sweep before
    better = mf < mb if settings.lower_is_better else mf > mb
    direction = "lower" if settings.lower_is_better else "higher"
    if not better:
        return None, (
            f"the full fine-tune does not beat the base on {on} ({mf:.4g} vs {mb:.4g}, {direction} is better): "
            "there is no gain for a LoRA to keep, so nothing is recommended (is the direction right? "
            "see lower_is_better / --lower-is-better)"
        )
    need = 1.0 - settings.tolerance
    loras = [
        p for p in points if p.kind in EXTRACTED_KINDS and p.ok and p.select_gain is not None and not p.dense_modules
    ]
    fits = [p for p in loras if (p.select_gain or 0.0) >= need - 1e-12]
    refs = f"base {mb:.4g}, full fine-tune {mf:.4g}"
    if not fits:
        if not loras:
            return None, f"no LoRA point below break-even could be evaluated ({refs}); nothing is recommended"
        best = max(loras, key=lambda p: p.select_gain or 0.0)
        return None, (
            f"no LoRA point below break-even keeps {100 * need:g}% of the full fine-tune's gain on {on} ({refs}); "
            f"the best, {best.label}, keeps {100 * (best.select_gain or 0.0):.1f}% with {100 * best.params_share:.1f}% "
            "of the dense parameters: fine-tune these modules fully, or accept the loss with a larger tolerance"
        )
    order = {p.label: i for i, p in enumerate(points)}
    pick = min(fits, key=lambda p: (p.lora_params, -round(p.select_gain or 0.0, 4), order[p.label]))
    metric, gain = value(pick), pick.select_gain or 0.0
    reported = "" if not selecting or pick.gain is None else f"; on the reported metric it keeps {100 * pick.gain:.1f}%"
    return pick.label, (
        f"{pick.label} keeps {100 * gain:.1f}% of the full fine-tune's gain on {on} ({metric:.4g}; {refs}) with "
        f"{pick.lora_params:,} LoRA parameters ({100 * pick.params_share:.1f}% of the dense matrices): the smallest "
        f"point within the tolerance of {100 * settings.tolerance:g}%{reported}"
    )
