"""The key vocabulary, defined once: file layouts, module kinds and reading order, embeddings, skip reasons, caveat.

A new model family is taught here (its embedding module names, its block's projections in execution order); every
stage that needs to know reads it from this module. Checkpoint keys themselves are never rewritten.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Final

# checkpoint and adapter layouts (Hugging Face, PEFT)
INDEX_NAME: Final = "model.safetensors.index.json"
SINGLE_NAME: Final = "model.safetensors"
ADAPTER_CONFIG: Final = "adapter_config.json"
ADAPTER_WEIGHTS: Final = "adapter_model.safetensors"
MODEL_CONFIG: Final = "config.json"

# modules whose weight rows are vocabulary entries (Llama/Mistral, GPT-NeoX, GPT-2, BERT, T5, Meta's llama format)
VOCAB_MODULES: Final = frozenset(
    {"embed_tokens", "lm_head", "embed_in", "embed_out", "wte", "word_embeddings", "shared", "tok_embeddings"}
)
# module kinds that are embeddings or output heads (plus any kind whose name contains "embed")
EMBEDDING_KINDS: Final = frozenset({"lm_head", "embed_out", "embed_in", "wte", "wpe", "shared", "tok_embeddings"})

# projections in the order a transformer block runs them; kinds not listed keep their name order after these
BLOCK_ORDER: Final = (
    "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "query", "key", "value", "attention.output.dense",
    "c_attn", "attn.c_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj", "w1", "w3", "w2", "fc1", "fc2",
    "intermediate.dense", "output.dense", "c_fc", "mlp.c_proj",
)  # fmt: skip

# why a tensor was not analysed: reason -> what it means (shown in reports)
SKIP_REASONS: Final = {
    "not-2d": "not a 2-D weight matrix (bias, norm, scalar)",
    "not-float": "not a floating-point tensor",
    "only-in-base": "present in the base checkpoint only",
    "only-in-tuned": "present in the tuned checkpoint only",
    "shape-mismatch": "base and tuned shapes differ",
    "excluded": "left out by include/exclude",
    "unchanged": "ΔW is exactly zero",
    "unsupported": "a tensor spectra cannot analyse",
}

# relative slack on τ·E: k equal σ reach k/n of the energy despite rounding in a cumulative sum
RANK_RTOL: Final = 1e-6

CAVEAT: Final = (
    "Caveat: captured energy is the most a LoRA of that rank can represent of ΔW (an upper bound in Frobenius "
    "norm), not a prediction of task accuracy; the rank a task needs can be lower than the rank that "
    "reconstructs ΔW (Biderman et al. 2024)."
)


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders `layers.2` before `layers.10`."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name))


def module_name(key: str) -> str:
    """PEFT module name of a checkpoint key: the key without its trailing ".weight"."""
    return key.removesuffix(".weight")


def is_embedding(kind: str) -> bool:
    """True for embedding and output-head module kinds (vLLM serves no LoRA on these by default)."""
    return "embed" in kind.lower() or kind.split(".")[-1] in EMBEDDING_KINDS


def is_vocabulary(key: str) -> bool:
    """True for a weight whose rows are vocabulary entries (an embedding or an output head)."""
    parts = key.split(".")
    module = parts[-2] if len(parts) > 1 and parts[-1] == "weight" else parts[-1]
    return module in VOCAB_MODULES or key == "output.weight"


def split_key(name: str) -> tuple[tuple[str, ...], int | None]:
    """(path after the block index without a trailing "weight", block index) of a checkpoint key."""
    parts = name.split(".")
    at = next((i for i, p in enumerate(parts) if p.isascii() and p.isdigit()), None)
    path = parts[at + 1 :] if at is not None else parts
    if len(path) > 1 and path[-1] == "weight":
        path = path[:-1]
    # indices after the block's (Mixture-of-Experts experts.7.w1) name instances of one kind, not kinds
    path = [p for p in path if not (p.isascii() and p.isdigit())] or path
    return tuple(path), None if at is None else int(parts[at])


def module_kinds(names: Sequence[str]) -> dict[str, tuple[str, int | None]]:
    """Checkpoint key -> (module kind, block index); the kind is the shortest path suffix unique in `names`.

    "model.layers.3.self_attn.q_proj.weight" -> ("q_proj", 3); in BERT, "...attention.output.dense.weight"
    -> ("attention.output.dense", i) and "...intermediate.dense.weight" -> ("intermediate.dense", i).

    Args:
        names: checkpoint keys, verbatim.
    """
    split = {name: split_key(name) for name in names}
    paths = {path for path, _ in split.values()}
    n_ending = Counter(path[-k:] for path in paths for k in range(1, len(path) + 1))

    def label(path: tuple[str, ...]) -> str:
        unique = next((path[-k:] for k in range(1, len(path) + 1) if n_ending[path[-k:]] == 1), path)
        return ".".join(unique)

    return {name: (label(path), layer) for name, (path, layer) in split.items()}


def reading_order(kind: str, layer: int | None) -> tuple[int, int, int]:
    """Sort key: embeddings first, then each block's matrices in execution order, then heads (ties: by name).

    Args:
        kind, layer: as returned by `module_kinds`.
    """
    if layer is None:
        return (0 if "embed" in kind or kind in ("wte", "wpe") else 2), 0, 0
    return 1, layer, BLOCK_ORDER.index(kind) if kind in BLOCK_ORDER else len(BLOCK_ORDER)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` safe for a terminal, TSV or a one-line message: control characters (ESC, newline, tab, C1) and lone
    surrogates become escapes like \\x1b or \\ud800. Checkpoint keys stay verbatim in records and JSON."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)
