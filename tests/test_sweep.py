"""`spectra.sweep`: the ladder, the choice, caching and failures, with a fake evaluator whose answer is known.

The fake evaluation of a model is −‖W_model − W_tuned‖_F / ‖W_tuned − W_base‖_F over the planted matrices. A LoRA
extracted at rank r with α = r merges to the truncated ΔW, so by Eckart–Young its value is −√(1 − E(r)) (E: the
energy-weighted captured share of every ΔW, from a float64 numpy SVD here), the base's −1 and the fine-tune's 0:
the gain is 1 − √(1 − E(r)) and the chosen rung for a tolerance is known before the sweep runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import spectra
from spectra import Candidate, EvaluationError, Evaluator, RankRule, SweepSettings, shell_evaluator

SHAPE = (48, 40)  # break-even r = 48·40/88 ≈ 21.8: the default ladder stops at 16


def distance(model: Path, base: Path, tuned: Path) -> float:
    """−‖W_model − W_tuned‖_F / ‖ΔW‖_F over the 2-D tensors (float64)."""
    m, b, t = (load_file(str(p)) for p in (model, base, tuned))
    num = sum(float(np.sum((m[k].astype(np.float64) - t[k]) ** 2)) for k in t if t[k].ndim == 2)
    den = sum(float(np.sum((t[k].astype(np.float64) - b[k]) ** 2)) for k in t if t[k].ndim == 2)
    return -math.sqrt(num / den)


def energy_curve(base: Path, tuned: Path) -> dict[int, float]:
    """r -> E(r) over every 2-D matrix, from the saved weights' ΔW in float64 (the reference)."""
    b, t = load_file(str(base)), load_file(str(tuned))
    sigmas = [np.linalg.svd(t[k].astype(np.float64) - b[k], compute_uv=False) for k in t if t[k].ndim == 2]
    total = sum(float(np.sum(s**2)) for s in sigmas)
    return {r: sum(float(np.sum(s[:r] ** 2)) for s in sigmas) / total for r in range(1, min(SHAPE) + 1)}


@pytest.fixture
def pair(planted_pair) -> tuple[Path, Path, dict[int, float]]:  # type: ignore[no-untyped-def]
    base, tuned, _ = planted_pair(shape=SHAPE)
    return base, tuned, energy_curve(base, tuned)


def fake(base: Path, tuned: Path, sign: float = 1.0, calls: list[str] | None = None) -> Evaluator:
    def evaluate(c: Candidate) -> float:
        if calls is not None:
            calls.append(c.label)
        return sign * distance(c.model, base, tuned)

    return Evaluator("distance", evaluate, None)


def settings(tmp_path: Path, **kw: object) -> SweepSettings:
    kw.setdefault("cache", False)
    return SweepSettings(**{"ranks": (1, 4, 8), "recommendation": False, **kw})  # type: ignore[arg-type]


def test_points_gain_energy_and_choice_match_eckart_young(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, tuned, energy = pair
    gain = {r: 1 - math.sqrt(1 - energy[r]) for r in energy}
    ranks = (1, 2, 4, 8, 16)
    # the tolerance that admits r = 8 and not r = 4: the known answer
    tolerance = 1 - (gain[8] + gain[4]) / 2
    assert gain[4] < 1 - tolerance <= gain[8]
    out = tmp_path / "out"
    s = settings(tmp_path, ranks=ranks, tolerance=tolerance)
    record = spectra.sweep(base, tuned, fake(base, tuned), settings=s, out_dir=out, page=spectra.sweep_html)
    assert [p.label for p in record.points] == ["base", "full fine-tune", *(f"r={r}" for r in ranks)]
    assert record.point("base").metric == pytest.approx(-1.0)
    assert record.point("full fine-tune").metric == pytest.approx(0.0, abs=1e-7)
    for r in ranks:
        p = record.point(f"r={r}")
        assert p.energy_kept == pytest.approx(energy[r], rel=1e-6)
        assert p.metric == pytest.approx(-math.sqrt(1 - energy[r]), rel=1e-5)
        assert p.gain == pytest.approx(gain[r], rel=1e-4)
        assert p.lora_params == 4 * r * sum(SHAPE) and p.dense_params == 4 * SHAPE[0] * SHAPE[1]
        assert (p.rank_min, p.rank_max, p.n_modules, p.dense_modules) == (r, r, 4, 0)
    assert record.chosen == "r=8"
    assert "r=8 keeps" in record.reason and f"{100 * gain[8]:.1f}%" in record.reason
    assert any("flatters" in n for n in record.notes)  # no separate selection evaluation
    # outputs: the record, its page, the chosen adapter (rank 8 everywhere); no other adapter kept
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "sweep.html", "sweep.json"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and not config.get("rank_pattern")
    assert spectra.load_record(out / "sweep.json") == record


def test_resize_of_the_top_equals_extraction_at_the_rank(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The sweep's shortcut: the SVD of B·A truncated to r is ΔW's truncation to r (unique where σ_r > σ_{r+1}: the
    geometric and power spectra; the rank-8 and step spectra have equal σ across r = 4, so only their energy is)."""
    base, tuned, _ = pair
    spectra.extract(base, tuned, tmp_path / "top", RankRule(rank=16), dtype="fp32")
    spectra.resize(tmp_path / "top", tmp_path / "small", RankRule(rank=4), dtype="fp32")
    spectra.extract(base, tuned, tmp_path / "direct", RankRule(rank=4), dtype="fp32")
    small, direct = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("small", "direct"))
    assert sorted(small) == sorted(direct) and len(small) == 8
    for a_key in (k for k in small if "lora_A" in k):
        b_key = a_key.replace("lora_A", "lora_B")
        got = small[b_key].astype(np.float64) @ small[a_key]
        want = direct[b_key].astype(np.float64) @ direct[a_key]
        assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(want), rel=1e-6)
        if "geometric" in a_key or "power" in a_key:
            assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)


def test_default_ladder_stops_below_break_even_and_user_ranks_above_are_never_chosen(  # type: ignore[no-untyped-def]
    pair, tmp_path: Path
) -> None:
    base, tuned, _ = pair
    record = spectra.sweep(base, tuned, fake(base, tuned), settings=settings(tmp_path, ranks=None, tolerance=0.5))
    assert [p.rank for p in record.points[2:]] == [1, 2, 4, 8, 16]
    assert any("32, 64, 128 left out" in n for n in record.notes)
    # r = 40 = min(m, n) reconstructs ΔW (gain 1) but costs more than the dense matrices: never the choice
    record = spectra.sweep(base, tuned, fake(base, tuned), settings=settings(tmp_path, ranks=(4, 40), tolerance=0.0))
    top = record.point("r=40")
    assert top.gain == pytest.approx(1.0, abs=1e-5) and top.dense_modules == 4
    assert record.chosen is None and "below break-even" in record.reason
    assert any("ranks 40 reach break-even" in n for n in record.notes)


def test_budgets_and_recommendation_use_extracts_rules(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, tuned, _ = pair
    s = settings(tmp_path, ranks=(4,), budgets=(0.05, 3000), recommendation=True, tolerance=0.99, keep_adapters=True)
    record = spectra.sweep(base, tuned, fake(base, tuned), settings=s, out_dir=tmp_path / "o")
    dense = 4 * SHAPE[0] * SHAPE[1]
    share, count, rec = record.point("budget 5%"), record.point("budget 3,000"), record.point("recommendation")
    assert (share.kind, count.kind, rec.kind) == ("budget", "budget", "recommendation")
    assert 0 < share.lora_params <= round(0.05 * dense) and 0 < count.lora_params <= 3000
    for p in (share, count, rec):  # a merged LoRA's distance is −√(1 − kept energy) whatever its ranks
        assert p.ok and p.metric == pytest.approx(-math.sqrt(1 - p.energy_kept), rel=1e-4)
    # every adapter kept; the chosen one (fewest parameters: tolerance 99% admits all) also in adapter/
    kept = sorted(p.name for p in (tmp_path / "o" / "adapters").iterdir())
    assert kept == ["budget-3000", "budget-5pct", "r4", "recommendation"]
    chosen = record.point(record.chosen or "")
    assert chosen.lora_params == min(p.lora_params for p in record.points[2:])
    assert (tmp_path / "o" / "adapter" / "adapter_model.safetensors").is_file()


def test_lower_is_better_and_a_fine_tune_that_does_not_beat_the_base(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, tuned, energy = pair
    tolerance = 1 - (1 - math.sqrt(1 - energy[8]))  # admits r = 8 (and not r = 4)
    lower = settings(tmp_path, lower_is_better=True, tolerance=tolerance + 1e-6)
    record = spectra.sweep(base, tuned, fake(base, tuned, sign=-1.0), settings=lower)  # +distance: lower is better
    assert record.chosen == "r=8"
    record = spectra.sweep(base, tuned, fake(base, tuned, sign=-1.0), settings=settings(tmp_path))
    assert record.chosen is None and "does not beat the base" in record.reason
    assert record.point("r=4").gain is not None  # the curve is still measured


def test_the_choice_follows_the_selection_metric(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, tuned, energy = pair
    gain = {r: 1 - math.sqrt(1 - energy[r]) for r in (1, 4, 8)}
    tolerance = 1 - (gain[8] + gain[4]) / 2  # on the selection metric: r = 8

    def reported(c: Candidate) -> float:  # a different metric: its gains are not the selection's
        return -(distance(c.model, base, tuned) ** 2)

    s = settings(tmp_path, tolerance=tolerance)
    record = spectra.sweep(base, tuned, Evaluator("test", reported), select=fake(base, tuned), settings=s)
    assert record.chosen == "r=8" and record.select_evaluator == "distance"
    p = record.point("r=8")
    assert p.select_gain == pytest.approx(gain[8], rel=1e-4)
    assert p.gain == pytest.approx(energy[8], rel=1e-4)  # 1 − (1 − E): the reported metric's own gain
    assert "on the reported metric it keeps" in record.reason and not any("flatters" in n for n in record.notes)


def test_cache_second_run_evaluates_nothing(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, tuned, _ = pair
    counter = tmp_path / "calls.txt"
    script = tmp_path / "evaluate.py"
    script.write_text(
        "import sys\nsys.path.insert(0, sys.argv[4])\nfrom test_sweep import distance\n"
        f"open({str(counter)!r}, 'a').write('x')\n"
        "print('evaluating', sys.argv[1])\nprint(distance(*sys.argv[1:4]))\n"
    )
    tests = shlex.quote(str(Path(__file__).parent))
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{model}} {{base}} {{tuned}} {tests}"
    s = settings(tmp_path, ranks=(1, 4), cache=True, cache_dir=str(tmp_path / "cache"))
    first = spectra.sweep(base, tuned, shell_evaluator(command), settings=s)
    assert len(counter.read_text()) == 4 and not any(p.cached for p in first.points)
    second = spectra.sweep(base, tuned, shell_evaluator(command), settings=s)
    assert len(counter.read_text()) == 4  # nothing evaluated again
    assert all(p.cached for p in second.points)
    strip = {"seconds": 0.0, "cached": False}
    assert [dataclasses.replace(p, **strip) for p in first.points] == [  # type: ignore[arg-type]
        dataclasses.replace(p, **strip)
        for p in second.points  # type: ignore[arg-type]
    ]
    assert first.chosen == second.chosen and first.reason == second.reason
    # another command (or timeout) is another key
    spectra.sweep(base, tuned, shell_evaluator(command, timeout=60), settings=s)
    assert len(counter.read_text()) == 8


def test_a_failing_rung_is_recorded_and_the_others_survive(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, tuned, _ = pair

    def evaluate(c: Candidate) -> float:
        if c.label == "r=4":
            raise RuntimeError("out of memory on purpose")
        return distance(c.model, base, tuned)

    record = spectra.sweep(base, tuned, Evaluator("flaky", evaluate), settings=settings(tmp_path, tolerance=0.9))
    bad = record.point("r=4")
    assert not bad.ok and bad.metric is None and "RuntimeError: out of memory on purpose" in (bad.error or "")
    assert all(p.ok for p in record.points if p.label != "r=4")
    assert record.chosen == "r=1"  # tolerance 0.9: the smallest rung qualifies


def test_a_failing_base_stops_the_sweep_and_writes_nothing(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, tuned, _ = pair
    calls: list[str] = []

    def evaluate(c: Candidate) -> float:
        calls.append(c.label)
        if c.label == "base":
            raise ValueError("cannot load")
        return 0.0

    with pytest.raises(EvaluationError, match=r"base: .*cannot load.*no point can be judged"):
        spectra.sweep(base, tuned, Evaluator("e", evaluate), settings=settings(tmp_path), out_dir=tmp_path / "out")
    assert calls == ["base"] and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_settings_are_validated() -> None:
    with pytest.raises(spectra.OptionsError, match="tolerance"):
        SweepSettings(tolerance=1.0)
    with pytest.raises(spectra.OptionsError, match="ranks"):
        SweepSettings(ranks=(0, 2))
    with pytest.raises(spectra.OptionsError, match="budget"):
        SweepSettings(budgets=(1.5,))
    assert SweepSettings.parse_budgets("1%, 5%,200000") == (0.01, 0.05, 200000.0)
    assert SweepSettings(ranks=(8, 2, 2)).ranks == (2, 8)
    with pytest.raises(spectra.OptionsError, match="--budgets"):
        SweepSettings.parse_budgets("lots")
    with pytest.raises(spectra.OptionsError, match="keep_adapters"):
        spectra.sweep("a", "b", lambda p: 0.0, settings=SweepSettings(keep_adapters=True))


# the shell template


def candidate(tmp_path: Path, adapter: bool = True) -> Candidate:
    odd = tmp_path / "a b" / 'it\'s "quoted" $HOME;'
    return Candidate("r=4", odd / "model.safetensors", odd / "adapter" if adapter else None, odd / "b", odd / "t")


ARGV = "import json, sys; print(json.dumps(sys.argv[1:])); print(2.5)"


def test_placeholders_are_quoted_and_the_last_line_is_the_metric(tmp_path: Path) -> None:
    c = candidate(tmp_path)
    record = tmp_path / "argv.json"
    script = tmp_path / "argv.py"
    script.write_text(f"import json, sys\nopen({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\nprint('x')\n"
                      "print('  ')\nprint(' 2.5 ')\n")  # fmt: skip
    ev = shell_evaluator(f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{model}} {{adapter}} {{base}} "
                         "{tuned} >&1; echo done >&2")  # fmt: skip
    assert ev(c) == 2.5
    assert json.loads(record.read_text()) == [str(c.model), str(c.adapter), str(c.base), str(c.tuned)]
    ev(dataclasses.replace(c, adapter=None))
    assert json.loads(record.read_text())[1] == ""  # {adapter} of the base and full points: an empty argument


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("run {model} {checkpoint}", r"unknown placeholder \{checkpoint\}"),
        ("run ${HOME} {model}", r"unknown placeholder \{HOME\}.*\{\{"),
        ("run {model!r}", "unknown placeholder"),
        ("run {adapter}", r"no \{model\} placeholder"),
        ("run {model", "literal braces"),
    ],
)
def test_bad_templates_are_refused_before_anything_runs(template: str, match: str) -> None:
    with pytest.raises(spectra.OptionsError, match=match):
        shell_evaluator(template)


def test_literal_braces_are_allowed(tmp_path: Path) -> None:
    assert shell_evaluator("x={model}; echo ${{x}} >/dev/null; echo 1")(candidate(tmp_path)) == 1.0


@pytest.mark.parametrize(
    ("command", "match", "output"),
    [
        ("true {model}", r"r=4: the evaluation printed nothing on stdout.*: true ", None),
        ("echo 0.5; echo done {model}", r"not a finite number \('done .*'\)", "0.5"),
        ("echo nan {model}", "not a finite number", None),
        ("echo progress; echo boom >&2; exit 3 {model}", "exited with status 3", "boom"),
    ],
)
def test_command_failures_name_the_point_and_the_command(tmp_path: Path, command: str, match: str,
                                                         output: str | None) -> None:  # fmt: skip
    with pytest.raises(EvaluationError, match=match) as info:
        shell_evaluator(command)(candidate(tmp_path))
    if output is not None:
        assert output in (info.value.output or "")


def test_timeout_kills_the_command_and_its_children(tmp_path: Path) -> None:
    import time

    started = time.perf_counter()
    with pytest.raises(EvaluationError, match=r"did not finish within 0\.5 s"):
        shell_evaluator("echo started; sleep 30 & sleep 30; echo {model}", timeout=0.5)(candidate(tmp_path))
    assert time.perf_counter() - started < 10


def test_a_sharded_base_is_merged_into_a_sharded_folder(planted_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """{model} has BASE's form: a folder with the same shard names and index for a sharded BASE."""
    base, tuned, _ = planted_pair(layout="shards", shape=SHAPE)
    shards = sorted(p.name for p in base.iterdir())
    seen: dict[str, list[str]] = {}

    def folder_distance(c: Candidate) -> float:
        seen[c.label] = sorted(p.name for p in c.model.iterdir())
        files = [{k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
                 for d in (c.model, base, tuned)]  # fmt: skip
        m, b, t = files
        num = sum(float(np.sum((m[k].astype(np.float64) - t[k]) ** 2)) for k in t if t[k].ndim == 2)
        den = sum(float(np.sum((t[k].astype(np.float64) - b[k]) ** 2)) for k in t if t[k].ndim == 2)
        return -math.sqrt(num / den)

    record = spectra.sweep(base, tuned, Evaluator("folder", folder_distance), settings=settings(tmp_path, ranks=(4,)))
    assert seen["base"] == shards and seen["r=4"] == shards
    assert record.point("r=4").metric == pytest.approx(-math.sqrt(1 - record.point("r=4").energy_kept), rel=1e-5)


def test_each_merge_is_deleted_once_evaluated_and_the_adapter_is_given(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, tuned, _ = pair
    seen: list[Candidate] = []

    def evaluate(c: Candidate) -> float:
        assert all(not p.model.exists() for p in seen if p.adapter is not None)  # earlier merges are gone
        assert c.model.is_file() and c.model.name == base.name  # BASE's form: a .safetensors file
        if c.adapter is not None:
            assert (c.adapter / "adapter_config.json").is_file()
        seen.append(c)
        return distance(c.model, base, tuned)

    spectra.sweep(base, tuned, Evaluator("e", evaluate), settings=settings(tmp_path, ranks=(1, 2)))
    assert [c.adapter is None for c in seen] == [True, True, False, False]
    assert [c.model for c in seen[:2]] == [base, tuned] and not seen[-1].model.exists()


def test_bad_inputs_are_refused_before_any_evaluation(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, tuned, _ = pair
    calls: list[str] = []
    spectra.extract(base, tuned, tmp_path / "adapter", RankRule(rank=2))
    for b, t, error in ((base, base, spectra.MismatchError), (base, tmp_path / "adapter", spectra.CheckpointError)):
        with pytest.raises(error):
            spectra.sweep(b, t, fake(base, tuned, calls=calls), settings=settings(tmp_path))
    assert calls == []


def test_a_trained_adapter_is_a_point_on_the_same_axes_never_chosen(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An adapter given as trained is merged and evaluated like the ladder's points: one that holds the rank-2
    truncation scores exactly what the r=2 rung scores, with r=2's size, no energy (its ΔW is not TUNED's), and is
    never the choice even when it is the smallest point within the tolerance."""
    base, tuned, energy = pair
    spectra.extract(base, tuned, tmp_path / "mine", RankRule(rank=2), dtype="fp32")
    s = settings(tmp_path, ranks=(2, 16), tolerance=0.999)  # every LoRA point qualifies: the smallest is chosen
    record = spectra.sweep(base, tuned, fake(base, tuned), settings=s, adapters={"mine": tmp_path / "mine"})
    mine, r2 = record.point("mine"), record.point("r=2")
    assert mine.kind == "trained" and mine.energy_kept is None and mine.ok
    assert mine.metric == pytest.approx(r2.metric, rel=1e-6)
    assert mine.metric == pytest.approx(-math.sqrt(1 - energy[2]), rel=1e-5)
    assert (mine.lora_params, mine.rank_max, mine.n_modules) == (r2.lora_params, 2, 4)
    assert record.chosen == "r=2"
    page = spectra.sweep_html(record)
    assert "mine" in page
    with pytest.raises(spectra.OptionsError, match="r=2"):
        spectra.sweep(base, tuned, fake(base, tuned), settings=s, adapters={"r=2": tmp_path / "mine"})
    with pytest.raises(spectra.CheckpointError, match="not a PEFT LoRA adapter"):
        spectra.sweep(base, tuned, fake(base, tuned), settings=s, adapters={"x": tuned})


def test_biases_are_carried_as_lora_bias_or_dropped(tmp_path: Path) -> None:
    """A changed bias of an adapted module reaches the merged model with biases="carry" (extract's default) and
    stays at the base with "drop" (a LoRA as usually trained): the fake metric is the merged bias's change."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    w, b = rng.standard_normal((24, 16)).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    dw, db = (rng.standard_normal((24, 1)) @ rng.standard_normal((1, 16))).astype(np.float32), np.ones(24, np.float32)
    save_file({"m.lin.weight": w, "m.lin.bias": b}, str(tmp_path / "base.safetensors"))
    save_file({"m.lin.weight": w + dw, "m.lin.bias": b + db}, str(tmp_path / "tuned.safetensors"))

    def bias_change(c: Candidate) -> float:
        return float(np.linalg.norm(load_file(str(c.model))["m.lin.bias"].astype(np.float64) - b))

    moved = {}
    for biases in ("carry", "drop"):
        s = settings(tmp_path, ranks=(1,), biases=biases)
        record = spectra.sweep(
            tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", Evaluator("bias", bias_change), settings=s
        )
        moved[biases] = record.point("r=1").metric
    assert moved["carry"] == pytest.approx(np.linalg.norm(db), rel=1e-6) and moved["drop"] == 0.0
    with pytest.raises(spectra.OptionsError, match="biases"):
        SweepSettings(biases="keep")
