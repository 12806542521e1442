"""Which modules an extraction adapts, and what else changed: selection of the dense pairs (targets, embeddings,
Conv1D orientation), bias changes (PEFT's lora_bias, all or none), and changed tensors a LoRA cannot carry.
Also the output-folder check shared by extract and resize.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final

import torch

from spectra.errors import CheckpointError, MismatchError, SpectraError
from spectra.io.checkpoint import Checkpoint
from spectra.lora.split import Target
from spectra.names import is_embedding, module_kinds, module_name, natural_key
from spectra.plan.dense import filter_reason, match_names, plan_pair
from spectra.plan.jobs import Dense, Job
from spectra.records import Options, Skipped

OUTPUT_HEADS: Final = frozenset({"lm_head", "embed_out", "output"})  # vocabulary kinds that are nn.Linear
CONV1D_MODELS: Final = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_KINDS: Final = frozenset({"c_attn", "c_proj", "c_fc", "q_attn", "attn.c_proj", "mlp.c_proj"})
COMPARE_BYTES: Final = 4 * 2**20  # rows of a non-2-D tensor compared at a time


def base_name(job: Job) -> str:
    """The base checkpoint key of a dense pair's job (the adapter's module names follow the base model)."""
    assert isinstance(job.operand, Dense) and job.operand.base is not None
    return job.operand.base.name


def check_output(out_dir: str | os.PathLike[str], inputs: Iterable[Checkpoint], overwrite: bool) -> None:
    """Refuse an output folder that is an input, inside one or holds one, or that is not empty without overwrite.

    Raises:
        SpectraError: as above, one line naming the folder.
    """
    out = Path(os.path.realpath(out_dir))
    for ck in inputs:
        where = Path(os.path.realpath(ck.location))
        inside = where.is_dir() and out.is_relative_to(where)  # a model folder is an input as a whole
        if out == where or inside or where.is_relative_to(out):
            raise SpectraError(
                f"{out}: the output folder is {ck.path}, inside it or holds it; choose a folder apart from the inputs"
            )
    if out.exists() and not out.is_dir():
        raise SpectraError(f"{out}: exists and is not a folder; choose another output folder")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise SpectraError(f"{out}: exists and is not empty; choose another output folder or pass --overwrite")


def select(
    base: Checkpoint, tuned: Checkpoint, options: Options, include_embeddings: bool, targets: Sequence[str] | None
) -> tuple[list[Job], list[Skipped], dict[str, str]]:
    """The dense jobs of the modules to adapt, what else is left out (with reasons), and base key -> module kind
    for every 2-D module weight of the base (what PEFT's key matching is verified against).

    Raises:
        MismatchError: nothing pairs, or no module is targeted.
    """
    plan = plan_pair(base, tuned, options)
    weights = [k for k, e in base.entries.items() if len(e.shape) == 2 and k.endswith(".weight")]
    kinds = {k: kind for k, (kind, _) in module_kinds(weights).items()}
    jobs: list[Job] = []
    left: list[Skipped] = [s for s in plan.skipped if s.reason != "not-2d"]  # tensor_changes lists those
    wanted = None if targets is None else {t.strip() for t in targets if t.strip()}
    for job in plan.jobs:
        name = base_name(job)
        kind = kinds.get(name)
        if kind is None:
            left.append(Skipped(name, "unsupported", "not a module's .weight: PEFT adapts modules"))
        elif job.note is not None:
            left.append(Skipped(name, "not-representable", "vocabulary resized: new rows have no base to adapt"))
        elif is_embedding(kind) and not include_embeddings:
            left.append(Skipped(name, "excluded", "embedding or output head; pass --include-embeddings to adapt it"))
        elif wanted is not None and not (kind in wanted or _suffix_in(module_name(name), wanted)):
            left.append(Skipped(name, "excluded", f"not in --target {','.join(sorted(wanted))}"))
        else:
            jobs.append(job)
    if not plan.jobs:
        raise MismatchError(f"{tuned.path}: no 2-D tensors pair with {base.path}; same architecture?")
    if not jobs:
        why = Counter(s.detail for s in left if s.reason == "excluded").most_common(1)
        raise MismatchError(
            f"{tuned.path}: no targeted module ({len(plan.jobs)} matrices left out"
            + (f", e.g. {why[0][0]}" if why else "")
            + "); check --target, --include/--exclude and --include-embeddings"
        )
    return jobs, left, kinds


def _suffix_in(module: str, wanted: set[str]) -> bool:
    parts = module.split(".")
    return any(".".join(parts[i:]) in wanted for i in range(len(parts)))


def is_embedding_layer(kind: str) -> bool:
    """An nn.Embedding (not an output head, which is an nn.Linear)."""
    return is_embedding(kind) and kind.split(".")[-1] not in OUTPUT_HEADS


def conv1d_names(base: Checkpoint, names: Sequence[str]) -> set[str]:
    """The keys among `names` of GPT-2-style Conv1D layers (weights stored (in, out); PEFT's fan_in_fan_out).

    Raises:
        CheckpointError: Conv1D-looking names and no config.json to tell Conv1D from Linear.
    """
    kinds = module_kinds(names)
    suspects = {n for n in names if kinds[n][0] in CONV1D_KINDS or kinds[n][0].split(".")[-1] in CONV1D_KINDS}
    if not suspects:
        return set()
    model_type = _model_type(base.location)
    if model_type is None:
        raise CheckpointError(
            f"{base.path}: modules like {sorted(suspects)[0]!r} may be GPT-2 Conv1D layers (weights stored "
            "transposed) or Linear ones, and there is no config.json beside the checkpoint to tell; add it"
        )
    return suspects if model_type in CONV1D_MODELS else set()


def _model_type(location: Path) -> str | None:
    folder = location if location.is_dir() else location.parent
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("model_type") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def changed_biases(
    base: Checkpoint, tuned: Checkpoint, jobs: Sequence[Job], biases: str
) -> tuple[dict[str, torch.Tensor], list[Skipped]]:
    """base weight key -> Δbias (float64) of the adapted modules whose bias changed (with "carry"), and the
    left-outs for changes that are not carried.

    Raises:
        SpectraError: a bias changed and PEFT's lora_bias cannot carry it (it needs a bias on every adapted
            module and no embedding).
    """
    found: dict[str, torch.Tensor] = {}
    for job in jobs:
        key = base_name(job).removesuffix(".weight") + ".bias"
        t_key = job.name.removesuffix(".weight") + ".bias"
        if key in base.entries and t_key in tuned.entries and base.entries[key].shape == tuned.entries[t_key].shape:
            delta = tuned.read(t_key).double() - base.read(key).double()
            if bool(torch.any(delta != 0)):
                found[base_name(job)] = delta
    if not found or biases == "drop":
        how = "--drop-biases" if biases == "drop" else ""
        return {}, [Skipped(_bias(k), "not-representable", f"bias changed; dropped ({how})") for k in found]
    missing = [base_name(j) for j in jobs if _bias(base_name(j)) not in base.entries]
    if missing:
        raise SpectraError(
            f"the biases of {len(found)} adapted modules changed (e.g. {_bias(next(iter(found)))}); PEFT carries them "
            f"only as lora_bias, which needs a bias on every adapted module, and {len(missing)} have none (e.g. "
            f"{missing[0]}); leave those out (--exclude, --target) or pass --drop-biases"
        )
    return found, []


def _bias(weight_key: str) -> str:
    return weight_key.removesuffix(".weight") + ".bias"


def with_biases(plan: Sequence[Target], bias_of: Mapping[str, torch.Tensor]) -> list[Target]:
    """Targets with their Δbias (zeros for unchanged ones) when any bias is carried: lora_bias is all or none.

    Raises:
        SpectraError: an embedding is adapted too (PEFT has no lora_bias for embeddings).
    """
    if not bias_of:
        return list(plan)
    if embeddings := [t.name for t in plan if t.embedding]:
        raise SpectraError(
            f"biases changed, and PEFT's lora_bias does not work with an adapted embedding ({embeddings[0]}); "
            "drop --include-embeddings or pass --drop-biases"
        )
    out = []
    for t in plan:
        rows = t.job.shape[1] if t.transpose else t.job.shape[0]
        bias = bias_of.get(t.name, torch.zeros(rows, dtype=torch.float64))
        out.append(Target(t.job, t.name, t.rank, t.embedding, t.transpose, bias))
    return out


def tensor_changes(base: Checkpoint, tuned: Checkpoint, kept: Sequence[Job], options: Options) -> list[Skipped]:
    """Left-outs for tensors outside 2-D module weights that changed (norms, biases of modules not adapted, N-D
    weights): a LoRA adapter cannot carry them. Tensors left out by include/exclude are not compared; the others
    are compared in row blocks, never whole."""
    adapted = {_bias(base_name(j)) for j in kept}
    tuned_of = {b: t for t, b in match_names(set(base.entries), set(tuned.entries)).items()}
    out = []
    for name, entry in sorted(base.entries.items(), key=lambda item: natural_key(item[0])):
        other = tuned.entries.get(tuned_of.get(name, ""))
        if len(entry.shape) == 2 or other is None or other.shape != entry.shape or not entry.is_float:
            continue
        if name in adapted or filter_reason(other.name, options) is not None:
            continue  # the bias of an adapted module (carried, or listed by changed_biases), or excluded
        if _differs(base, tuned, name, other.name):
            what = "1-D tensor (norm or bias)" if len(entry.shape) == 1 else f"{len(entry.shape)}-D tensor"
            out.append(Skipped(name, "not-representable", f"{what} changed; LoRA adapts 2-D weights only"))
    return out


def _differs(base: Checkpoint, tuned: Checkpoint, b_name: str, t_name: str) -> bool:
    entry = base.entries[b_name]
    if len(entry.shape) == 0:
        return not torch.equal(base.read(b_name), tuned.read(t_name))
    per_row = max(1, entry.nbytes // max(1, entry.shape[0]))
    step = max(1, COMPARE_BYTES // per_row)
    for lo in range(0, entry.shape[0], step):
        rows = (lo, min(entry.shape[0], lo + step))
        if not torch.equal(base.read(b_name, rows), tuned.read(t_name, rows)):
            return True
    return False
