"""`sweep`: the task metric of LoRAs extracted from a full fine-tune at a ladder of sizes, and the smallest that
keeps the gain.

Points: the base and the full fine-tune (the references), one uniform rank per rung, one budgeted allocation per
budget, and spectra's recommendation. The uniform rungs come from ONE extraction at the top rung, resized down
(`spectra.lora.resize`: exact, the SVD of B·A truncated to r is ΔW's truncation to r); budgets and the
recommendation use extract's own rules. Each LoRA is merged into a temporary copy of BASE (`merge_adapter`, BASE's
form), evaluated, and the copy is deleted at once (a 7B merge is 14 GB). Evaluations are cached
(`spectra.lora.evaluate`).

Choice: g(p) = (m(p) − m_base) / (m_full − m_base) on the selection metric (the `select` evaluation if given,
else the reported one); the point with the fewest LoRA parameters with g ≥ 1 − tolerance and no module at or
above break-even (r·(m + n) ≥ m·n) is recommended; none if the full fine-tune does not beat the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from spectra.engine.executor import ProgressHook, identity
from spectra.errors import OptionsError, SpectraError
from spectra.io.checkpoint import open_checkpoint
from spectra.io.outputs import Outputs
from spectra.lora.choose import choose, gain_of, ladder
from spectra.lora.evaluate import (
    Candidate,
    EvalCache,
    EvaluationError,
    Evaluator,
    adapter_identity,
    checkpoint_identity,
    default_cache_dir,
    save_sweep,
)
from spectra.lora.extract import _check_inputs, extract
from spectra.lora.points import budget_label, check_trained, failed, shown
from spectra.lora.resize import resize
from spectra.lora.rules import RankRule
from spectra.lora.split import ExtractResult, default_dtype
from spectra.lora.targets import select as select_modules
from spectra.peft.merge import merge_adapter
from spectra.plan.jobs import Dense
from spectra.records import Options, Sweep, SweepPoint, SweepSettings

Evaluate = Evaluator | Callable[[Path], float]


def _silent(message: str) -> None:
    pass


def sweep(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    evaluate: Evaluate,
    *,
    settings: SweepSettings | None = None,
    select: Evaluate | None = None,
    options: Options | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    adapters: Mapping[str, str | os.PathLike[str]] | None = None,
    page: Callable[[Sweep], str] | None = None,
    echo: Callable[[str], None] = _silent,
    progress: ProgressHook = identity,
) -> Sweep:
    """Evaluate the base, the full fine-tune and LoRAs extracted from it at a ladder of sizes; recommend one.

    Args:
        base, tuned: full checkpoints as for `extract` (files, folders, shards, hub ids).
        evaluate: the reported evaluation: a callable of the model path returning the metric, or an Evaluator
            (`shell_evaluator(template)` for a command; cached when it has a key).
        settings: ladder, budgets, tolerance, direction, cache, targets (SweepSettings()).
        select: the evaluation the choice is made on (a validation split); None: `evaluate` (flatters it).
        options: device, precision, include/exclude, threads, download, as for `extract`.
        out_dir: write sweep.json, adapter/ (the chosen LoRA), adapters/ (with keep_adapters) and sweep.html
            (with `page`) there, all or nothing; None: nothing is written.
        overwrite: replace a non-empty `out_dir`.
        adapters: label -> a PEFT LoRA adapter folder trained on the same base (e.g. the LoRA you trained), merged
            and evaluated like the ladder's points and shown on the same axes ("trained" points; never chosen: the
            choice is among the LoRAs extracted from TUNED).
        page: renders the HTML page (spectra.sweep_html); None: no sweep.html.
        echo: receives one progress line per step ("[3/9] r=4: extract 0.4 s, ... → 0.634 (92% of gain)").
        progress: wraps each extraction pass's stream of matrices.

    Raises:
        OptionsError: bad settings; keep_adapters without out_dir; out_dir is an input or not empty.
        CheckpointError, MismatchError: as `extract` (missing inputs, nothing pairs or changed); an `adapters`
            folder that is not a LoRA adapter; a label used twice.
        EvaluationError: the base or the full fine-tune cannot be evaluated (with the output's last lines in
            `.output`): without both references no point can be judged, so nothing else runs.
    """
    started = time.perf_counter()
    settings = settings or SweepSettings()
    if settings.keep_adapters and out_dir is None:
        raise OptionsError("keep_adapters needs an output folder (out_dir; CLI: -o DIR)")
    evaluators = (Evaluator.of(evaluate), None if select is None else Evaluator.of(select))
    folder = (Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()) if settings.cache else None
    trained = {str(k): Path(v) for k, v in (adapters or {}).items()}
    run = _Run(os.fspath(base), os.fspath(tuned), settings, options or Options(), evaluators, EvalCache(folder))
    run.trained = trained
    run.echo, run.progress = echo, progress
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="spectra-sweep-") as work:
            return run.sweep(Path(work), None, started)
    outputs = Outputs([base, tuned])
    target = outputs.folder(out_dir, "out_dir", overwrite=overwrite)
    with outputs:
        staged = outputs.stage(target)
        staged.mkdir()
        record = run.sweep(staged.parent / "work", staged, started)
        save_sweep(record, staged / "sweep.json")
        if page is not None:
            (staged / "sweep.html").write_text(page(record), encoding="utf-8")
    return record


@dataclasses.dataclass(slots=True)
class _Run:
    """One sweep's inputs and state while it runs."""

    base: str
    tuned: str
    settings: SweepSettings
    options: Options
    evaluators: tuple[Evaluator, Evaluator | None]
    cache: EvalCache
    echo: Callable[[str], None] = _silent
    progress: ProgressHook = identity
    shapes: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    store: str = "fp32"
    paths: tuple[Path, Path] = (Path(), Path())  # base, tuned as read (files or folders)
    ids: tuple[str, str] = ("", "")
    refs: tuple[list[float | None], list[float | None]] = dataclasses.field(default_factory=lambda: ([], []))
    dense: int = 0
    total_energy: float = 0.0
    step: int = 0
    n_steps: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    trained: dict[str, Path] = dataclasses.field(default_factory=dict)  # label -> adapter folder
    trained_sizes: dict[str, tuple[list[int], int, int]] = dataclasses.field(default_factory=dict)
    work: Path = Path()

    def sweep(self, work: Path, out: Path | None, started: float) -> Sweep:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self._inspect()
        ranks = self._ladder()
        s = self.settings
        planned = {"base", "full fine-tune", "recommendation", *(f"r={r}" for r in ranks)}
        if clash := sorted(planned.union(budget_label(b)[0] for b in s.budgets).intersection(self.trained)):
            raise OptionsError(f"adapter label {clash[0]!r} is the label of a sweep point; give it another")
        self.n_steps = 2 + len(ranks) + len(s.budgets) + int(s.recommendation) + len(self.trained)
        points = [self._reference("base"), self._reference("full fine-tune")]
        top = self._extract(work / "top", RankRule(rank=max(ranks)), "fp32")
        self.dense = top.dense_params
        self.total_energy = sum(m.energy for m in top.modules) + top.dropped_energy
        points[1] = dataclasses.replace(points[1], lora_params=self.dense, dense_params=self.dense, params_share=1.0)
        points[0] = dataclasses.replace(points[0], dense_params=self.dense)
        self.echo(f"extracted the top rung once (r={max(ranks)}, {len(top.modules)} modules): {top.elapsed_s:.1f} s")
        adapters: dict[str, Path] = {}
        for r in ranks:
            rule = RankRule(rank=r)
            adapters[f"r={r}"] = work / "adapters" / f"r{r}"
            points.append(self._lora(f"r={r}", "uniform", r, rule, adapters[f"r={r}"], work / "top"))
        for b in s.budgets:
            label, slug = budget_label(b)
            adapters[label] = work / "adapters" / slug
            rule = RankRule(budget=max(1, round(b * self.dense)) if b < 1 else int(b))
            points.append(self._lora(label, "budget", None, rule, adapters[label], None))
        if s.recommendation:
            adapters["recommendation"] = work / "adapters" / "recommendation"
            rule = RankRule(auto=True)
            points.append(self._lora("recommendation", "recommendation", None, rule, adapters["recommendation"], None))
        points += [self._trained(label, folder) for label, folder in self.trained.items()]
        if self.evaluators[1] is None:
            self.notes.append(
                "the choice was made on the reported evaluation itself, which flatters it (the best of several "
                "noisy points looks better than it is); give a separate selection evaluation (select=, CLI: "
                "--eval-select on a validation split) to report an unbiased metric"
            )
        chosen, reason = choose(points, s, self.evaluators[1] is not None)
        points = self._keep(points, chosen, adapters, out)
        return Sweep(
            base=self.base,
            tuned=self.tuned,
            options=self.options,
            settings=s,
            evaluator=self.evaluators[0].name,
            select_evaluator=None if self.evaluators[1] is None else self.evaluators[1].name,
            points=tuple(points),
            chosen=chosen,
            reason=reason,
            notes=tuple(self.notes),
            elapsed_s=time.perf_counter() - started,
            version=_version(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    def _inspect(self) -> None:
        """Shapes of the targeted modules (for break-even), the adapters' dtype, and the inputs' identities."""
        s = self.settings
        with contextlib.ExitStack() as stack:
            cks = [
                stack.enter_context(open_checkpoint(p, download=self.options.download)) for p in (self.base, self.tuned)
            ]
            _check_inputs(cks[0], cks[1])  # an adapter or TUNED = BASE: refused before anything is evaluated
            for label, folder in self.trained.items():
                self.trained[label], self.trained_sizes[label] = check_trained(label, folder)
            jobs, _, _ = select_modules(cks[0], cks[1], self.options, s.include_embeddings, s.targets)
            self.shapes = [j.shape for j in jobs]
            self.store = default_dtype(j.operand.tuned.dtype_name for j in jobs if isinstance(j.operand, Dense))
            self.paths = (cks[0].location, cks[1].location)
            files = [[e.file for e in ck.entries.values()] for ck in cks]
        self.ids = (checkpoint_identity(files[0]), checkpoint_identity(files[1]))

    def _ladder(self) -> list[int]:
        ranks, notes = ladder(self.shapes, self.settings.ranks)
        self.notes += notes
        return ranks

    def _say(self, label: str, steps: str) -> None:
        self.step += 1
        self.echo(f"[{self.step}/{self.n_steps}] {label}: {steps}")

    def _reference(self, label: str) -> SweepPoint:
        """The base or the full fine-tune, evaluated as given (an EvaluationError ends the sweep)."""
        full = label != "base"
        candidate = Candidate(label, self.paths[full], None, self.paths[0], self.paths[1])
        started = time.perf_counter()
        metrics: list[float | None] = []
        cached = True
        for evaluator in self.evaluators:
            if evaluator is None:
                metrics.append(None)
                continue
            key = self.cache.key(evaluator, "checkpoint", self.ids[full])
            value = self.cache.get(key)
            if value is None:
                cached = False
                try:
                    value = evaluator(candidate)
                except EvaluationError as exc:
                    self._say(label, f"evaluate → failed: {exc}")
                    raise EvaluationError(
                        f"{exc}. Without the {label}'s metric no point can be judged; nothing else was evaluated",
                        exc.output,
                    ) from None
                self.cache.put(key, value, evaluator.name, label)
            metrics.append(value)
        self.refs[0].append(metrics[0])
        self.refs[1].append(metrics[1])
        seconds = time.perf_counter() - started
        self._say(label, f"{'cached' if cached else f'evaluate {seconds:.1f} s'} → {shown(metrics)}")
        return SweepPoint(
            label, "full" if full else "base", None, 0, 0.0, 0, 0, 0, 0, 0.0, float(full), 0,
            metrics[0], metrics[1], float(full), float(full) if metrics[1] is not None else None,
            None, None, seconds, cached,
        )  # fmt: skip

    def _extract(self, out: Path, rule: RankRule, dtype: str) -> ExtractResult:
        s = self.settings
        return extract(self.base, self.tuned, out, rule, self.options, dtype=dtype,
                       include_embeddings=s.include_embeddings, targets=s.targets, biases=s.biases,
                       progress=self.progress)  # fmt: skip

    def _lora(self, label: str, kind: str, rank: int | None, rule: RankRule, out: Path, top: Path | None) -> SweepPoint:
        """A LoRA point: extract (or resize `top`), merge, evaluate, delete the merge; failures are recorded."""
        started = time.perf_counter()
        try:
            if top is not None:
                options = dataclasses.replace(self.options, include=None, exclude=None)  # `top` holds the selection
                result = resize(top, out, rule, options, dtype=self.store, progress=self.progress)
            else:
                result = self._extract(out, rule, self.store)
        except SpectraError as exc:
            self._say(label, f"extract → failed: {exc}")
            return failed(label, kind, rank, self.dense, f"extraction failed: {exc}", time.perf_counter() - started)
        extracted = time.perf_counter() - started
        kept = sum(m.captured * m.energy for m in result.modules) / self.total_energy if self.total_energy else 0.0
        dense_modules = sum(m.rank * (m.shape[0] + m.shape[1]) >= m.shape[0] * m.shape[1] for m in result.modules)
        ranks = [m.rank for m in result.modules]
        size = (ranks, result.params, min(kept, 1.0), dense_modules)
        return self._evaluated(label, kind, rank, size, out, started, f"extract {extracted:.1f} s, ")

    def _trained(self, label: str, folder: Path) -> SweepPoint:
        """A LoRA trained elsewhere: merged and evaluated like the extracted ones; its size from its factors."""
        started = time.perf_counter()
        ranks, params, dense_modules = self.trained_sizes[label]
        return self._evaluated(label, "trained", None, (ranks, params, None, dense_modules), folder, started, "")

    def _evaluated(
        self,
        label: str,
        kind: str,
        rank: int | None,
        size: tuple[list[int], int, float | None, int],
        adapter: Path,
        started: float,
        steps: str,
    ) -> SweepPoint:
        """The point of `adapter` (size: per-module ranks, LoRA parameters, energy kept, modules at break-even):
        merged and evaluated (`_measure`), its gains, and its progress line (after `steps`)."""
        ranks, params, kept, dense_modules = size
        metrics, timing, cached, error, output = self._measure(label, adapter)
        gains = [gain_of(v, ref) for v, ref in zip(metrics, self.refs, strict=True)]
        select_gain = gains[1] if self.evaluators[1] is not None else gains[0]
        steps += "cached" if cached else timing
        self._say(label, f"{steps} → " + (f"failed: {error}" if error else shown(metrics, gains)))
        return SweepPoint(
            label, kind, rank, min(ranks), float(np.median(ranks)), max(ranks), len(ranks), params,
            self.dense, params / self.dense if self.dense else 0.0, kept, dense_modules,
            metrics[0], metrics[1], gains[0], select_gain, error, output, time.perf_counter() - started, cached,
        )  # fmt: skip

    def _measure(self, label: str, adapter: Path) -> tuple[list[float | None], str, bool, str | None, str | None]:
        """(metrics, "merge … s, evaluate … s", all cached, error, output tail): merged only when not cached."""
        identity_ = adapter_identity(adapter) if self.cache.folder is not None else ""
        keys = [None if e is None else self.cache.key(e, "lora", identity_, *self.ids) for e in self.evaluators]
        metrics = [None if e is None else self.cache.get(k) for e, k in zip(self.evaluators, keys, strict=True)]
        missing = [i for i, e in enumerate(self.evaluators) if e is not None and metrics[i] is None]
        if not missing:
            return metrics, "", True, None, None
        merged_dir = self.work / "merged" / f"point-{self.step + 1}"  # unique: labels and folder names may clash
        model = merged_dir / self.paths[0].name if self.paths[0].is_file() else merged_dir
        started = time.perf_counter()
        try:
            merge_adapter(self.base, adapter, model, overwrite=True, download=self.options.download)
        except SpectraError as exc:
            shutil.rmtree(merged_dir, ignore_errors=True)
            return metrics, "merge failed", False, f"merge failed: {exc}", None
        merge_s, error, output = time.perf_counter() - started, None, None
        candidate = Candidate(label, model, adapter, self.paths[0], self.paths[1])
        try:
            for i in missing:
                evaluator = self.evaluators[i]
                assert evaluator is not None
                try:
                    metrics[i] = evaluator(candidate)
                except EvaluationError as exc:
                    error, output = str(exc), exc.output
                    break
                self.cache.put(keys[i], metrics[i], evaluator.name, label)  # type: ignore[arg-type]
        finally:
            shutil.rmtree(merged_dir, ignore_errors=True)  # at once: a merged 7B model is 14 GB
        timing = f"merge {merge_s:.1f} s, evaluate {time.perf_counter() - started - merge_s:.1f} s"
        return metrics, timing, False, error, output

    def _keep(
        self, points: list[SweepPoint], chosen: str | None, adapters: dict[str, Path], out: Path | None
    ) -> list[SweepPoint]:
        """Move the chosen adapter to OUT/adapter (and every adapter to OUT/adapters/ with keep_adapters)."""
        if out is None:
            return points
        kept = []
        for p in points:
            where = adapters.get(p.label)
            if where is None or not where.is_dir():
                kept.append(p)
                continue
            if p.label == chosen:
                shutil.copytree(where, out / "adapter")
            if self.settings.keep_adapters:
                (out / "adapters").mkdir(exist_ok=True)
                shutil.move(where, out / "adapters" / where.name)
                p = dataclasses.replace(p, adapter=f"adapters/{where.name}")
            elif p.label == chosen:
                p = dataclasses.replace(p, adapter="adapter")
            kept.append(p)
        return kept


def _version() -> str:
    try:
        return metadata.version("spectra-lm")
    except metadata.PackageNotFoundError:
        return "0+unknown"
