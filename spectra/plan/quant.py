"""Quantised bases (QLoRA): dequant(quant(W)) with bitsandbytes' own routines, the weights a QLoRA run quantises,
and the probe that finds a base's quantisation error inside ΔW.

A QLoRA adapter is trained on dequant(NF4(W_base)), so a model merged from it holds dequant(NF4(W_base)) + s·B@A.
Diffed against the 16-bit base, ΔW gains the full-rank quantisation error (about 9% of ‖W‖_F for NF4 at block
size 64, often far more than s·B@A). `round_trip` computes what the training saw, with bitsandbytes itself (its CPU
path; never a hand-written NF4), so ΔW can be formed against it; `probe` measures, on a sample of blocks, whether a
ΔW carries that error when nobody said so.

bitsandbytes is an optional dependency (`pip install 'spectra-lm[quant]'`), imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Final

import torch

from spectra.errors import OptionsError
from spectra.names import is_embedding, is_vocabulary, split_key
from spectra.records import Options, QuantProbe

log = logging.getLogger(__name__)

# transformers keeps the model's last module (the task head) in 16 bits, besides embeddings and lm_head
TASK_HEADS: Final = frozenset({"score", "classifier", "qa_outputs"})
# GPT-2's Conv1D stores (in, out); transformers transposes it to (out, in) before bitsandbytes quantises it
CONV1D_MODULES: Final = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
PROBE_BLOCK: Final = 64  # the block size of the probe's 4-bit types: transformers' (BitsAndBytesConfig has no other)
PROBE_ELEMENTS: Final = 1 << 16  # elements of W_base sampled per matrix (1024 blocks of 64)
PROBE_SEGMENTS: Final = 8  # row ranges the sample is spread over
QUANT_CHUNK: Final = 1 << 22  # elements quantised at a time (a multiple of every block size): ~50 MB temporaries


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """How a QLoRA run quantised one base weight, as bitsandbytes' Linear4bit / Linear8bitLt do it (picklable)."""

    kind: str  # "nf4" | "fp4" (4-bit, blockwise absmax over the flattened weight) | "int8" (row-wise absmax)
    block_size: int  # 4-bit: elements per absmax block
    double_quant: bool  # 4-bit: the absmax values quantised again (8-bit, blocks of 256), QLoRA's default
    transpose: bool  # quantise Wᵀ: a GPT-2 Conv1D weight, stored (in, out)


def quantized_by_qlora(name: str) -> bool:
    """True for a weight that QLoRA's bitsandbytes layers replace (every linear layer's weight), False for
    embeddings, lm_head and other vocabulary matrices, task heads (score, classifier, qa_outputs) and non-weights;
    norms and biases are 1-D and never reach here."""
    path, _ = split_key(name)
    if not name.endswith(".weight") or is_vocabulary(name) or is_embedding(".".join(path)):
        return False
    return path[-1] not in TASK_HEADS


def quantized_transposed(name: str) -> bool:
    """True for a GPT-2 Conv1D weight (attn.c_attn, c_proj, mlp.c_fc, q_attn), stored (in, out): transformers
    quantises its transpose. Remote-code models that name nn.Linear layers so (Qwen-1) are quantised wrongly."""
    return split_key(name)[0][-1] in CONV1D_MODULES


def base_quant(name: str, options: Options) -> QuantSpec | None:
    """The quantisation QLoRA applied to base weight `name` under `options.base_quantization`, or None (no
    quantisation asked for, or a weight QLoRA leaves in 16 bits).

    Raises:
        OptionsError: a quantisation is asked for and bitsandbytes is not installed.
    """
    if options.base_quantization is None or not quantized_by_qlora(name):
        return None
    require_bitsandbytes()
    return QuantSpec(
        options.base_quantization, options.quant_block_size, options.double_quant, quantized_transposed(name)
    )


def dense_quant(name: str, options: Options) -> tuple[QuantSpec | None, bool]:
    """(Dense.base_quant, Dense.quant_probe) for the pair of weight `name`: the base's quantisation when one is
    asked for, and whether to probe ΔW for a quantisation error of W_base (a weight QLoRA would quantise, and
    bitsandbytes installed to compute it): with no quantisation given, to find a merged QLoRA model; with one, to
    find that it was not the one the run used.

    Raises:
        OptionsError: a quantisation is asked for and bitsandbytes is not installed.
    """
    return base_quant(name, options), quantized_by_qlora(name) and bitsandbytes_available()


def quant_note(specs: list[QuantSpec | None]) -> str | None:
    """The Analysis note of a plan whose base weights were quantised (one spec per job; None for the others)."""
    used = [spec for spec in specs if spec is not None]
    if not used:
        return None
    spec, kept = used[0], len(specs) - len(used)
    how = "row-wise absmax" if spec.kind == "int8" else f"block size {spec.block_size}, double quantisation "
    how += "" if spec.kind == "int8" else ("on" if spec.double_quant else "off")
    others = f"; the {kept} others (embeddings, lm_head, task heads) are diffed against the base as stored"
    return (
        f"ΔW is formed against dequant(quant(W_base)), {spec.kind} ({how}) computed with bitsandbytes, for the "
        f"{len(used)} linear weights a QLoRA run quantises" + (others if kept else "")
    )


@cache
def bitsandbytes_available() -> bool:
    """True when bitsandbytes imports (checked once per process; a broken install counts as missing, logged)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    try:
        require_bitsandbytes()
    except Exception as exc:  # any failure of a third-party import: the probe is optional, the analysis goes on
        log.warning("bitsandbytes is installed but does not import (%s); ΔW is not checked for a quantised base", exc)
        return False
    return True


def require_bitsandbytes() -> ModuleType:
    """bitsandbytes.functional, imported quietly (its CPU backend logs a warning about an optional kernel package).

    Raises:
        OptionsError: bitsandbytes is not installed (one line: how to install it).
    """
    bnb_logger = logging.getLogger("bitsandbytes")
    previous = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module("bitsandbytes.functional")
    except ImportError:
        raise OptionsError(
            "--base-quantization (Options.base_quantization) needs bitsandbytes, which is not installed: "
            "pip install 'spectra-lm[quant]'"
        ) from None
    finally:
        bnb_logger.setLevel(previous)


def round_trip(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequant(quant(w)) as bitsandbytes computes it for a Linear4bit (nf4/fp4) or Linear8bitLt (int8) weight.

    4-bit: blockwise absmax over the flattened weight (Wᵀ for a Conv1D), quantised `QUANT_CHUNK` elements at a
    time (block-aligned, so every block is bitsandbytes' own) with the absmax values then double-quantised over the
    whole tensor as `quantize_4bit` does; dequantised by `dequantize_4bit` in w's dtype (bf16, f16 or f32; other
    dtypes are quantised from float32). int8: `int8_vectorwise_quant` of the float16 weight, row by row block,
    dequantised to float32 by `int8_vectorwise_dequant`.

    Args:
        w: the stored base weight, 2-D, on the CPU.
        spec: how it was quantised.

    Returns:
        A tensor of w's shape: w's dtype for 4-bit (float32 if w is neither bf16, f16 nor f32), float32 for int8.
    """
    functional = require_bitsandbytes()
    x = w.mT if spec.transpose else w
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        x = x.float()
    x = x.contiguous()
    out = _int8(functional, x) if spec.kind == "int8" else _four_bit(functional, x, spec)
    return out.mT if spec.transpose else out


def _four_bit(functional: ModuleType, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    flat = x.reshape(-1)
    n = flat.numel()
    if n % 2:  # one zero completes the last (partial) block without changing its absmax: every code is the same
        flat = torch.cat([flat, flat.new_zeros(1)])
    packed, absmax = [], []
    for i in range(0, flat.numel(), QUANT_CHUNK):
        q, state = functional.quantize_4bit(
            flat[i : i + QUANT_CHUNK], blocksize=spec.block_size, compress_statistics=False, quant_type=spec.kind
        )
        packed.append(q)
        absmax.append(state.absmax)
    scales = torch.cat(absmax)
    code = functional.get_4bit_type(spec.kind, device=flat.device)
    extra = {}
    if spec.double_quant:  # as quantize_4bit(compress_statistics=True) does it, over the whole tensor's absmax
        offset = scales.mean()
        scales, nested = functional.quantize_blockwise(scales - offset, blocksize=256)
        extra = {"offset": offset, "state2": nested}
    state = functional.QuantState(
        absmax=scales,
        shape=flat.shape,
        dtype=flat.dtype,
        blocksize=spec.block_size,
        code=code,
        quant_type=spec.kind,
        **extra,
    )
    out: torch.Tensor = functional.dequantize_4bit(torch.cat(packed), state)
    return out.reshape(-1)[:n].reshape(x.shape)


def _int8(functional: ModuleType, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32)
    step = max(1, QUANT_CHUNK // max(1, x.shape[1]))
    for lo in range(0, x.shape[0], step):
        cb, scb, _ = functional.int8_vectorwise_quant(x[lo : lo + step].to(torch.float16))
        out[lo : lo + step] = functional.int8_vectorwise_dequant(cb, scb)
    return out


def probe_rows(shape: tuple[int, int], transpose: bool) -> list[tuple[int, int]]:
    """Row ranges of W_base the probe samples: about PROBE_ELEMENTS elements in PROBE_SEGMENTS ranges spread over
    the matrix, each starting and ending on 4-bit block boundaries of the quantised layout (rows whose element
    count is a multiple of 64; for a transposed (Conv1D) weight, 64 rows), so its blocks are the whole tensor's."""
    rows, cols = shape
    unit = PROBE_BLOCK if transpose else PROBE_BLOCK // math.gcd(cols, PROBE_BLOCK)
    per = max(unit, -(-PROBE_ELEMENTS // (PROBE_SEGMENTS * cols * unit)) * unit)
    if rows * cols <= 2 * PROBE_ELEMENTS or PROBE_SEGMENTS * per >= rows:
        return [(0, rows)]
    starts = [(i * (rows - per) // (PROBE_SEGMENTS - 1)) // unit * unit for i in range(PROBE_SEGMENTS)]
    ranges: list[tuple[int, int]] = []
    for lo in sorted(set(starts)):
        if ranges and lo < ranges[-1][1]:
            lo = ranges[-1][1]
        if lo + per <= rows:
            ranges.append((lo, lo + per))
    return ranges


def probe(base: list[torch.Tensor], delta: list[torch.Tensor], total: int, transpose: bool) -> QuantProbe | None:
    """Which base quantisation's error ΔW carries, from sampled row ranges of W_base and of ΔW (`probe_rows`).

    For each candidate (nf4 and fp4 at block size 64 without double quantisation, int8 unless transposed) the
    error E = dequant(quant(W)) − W of the sample is computed with bitsandbytes (one call per candidate: the ranges
    are block-aligned, so their flattened concatenation has the whole tensor's blocks); the candidate whose E
    explains the most of ΔW on the sample (⟨ΔW, E⟩² / ‖E‖²) is returned with its coefficient ⟨ΔW, E⟩ / ‖E‖² and
    ‖E‖² scaled to the whole matrix (× total / sampled elements). A merged QLoRA model gives a coefficient near 1
    (s·B@A is nearly orthogonal to E), any other fine-tune one near 0. None when no candidate correlates positively.

    Args:
        base: the sampled rows of W_base as stored, one tensor per range.
        delta: the same rows of ΔW (float32 or float64).
        total: elements of the whole matrix.
        transpose: the weight is quantised transposed (Conv1D).
    """
    rows_w, rows_d = torch.cat(base), torch.cat(delta).double()
    # the best candidate by the energy it explains, among those ΔW holds with a positive sign (diffed against the
    # wrong quantisation, ΔW = E_used − E_given + s·B@A: E_given has coefficient ≈ −1, E_used ≈ +1)
    flat_w = torch.cat([(w.mT if transpose else w).reshape(-1) for w in base]).view(1, -1)
    flat_d = torch.cat([(d.mT if transpose else d).reshape(-1) for d in delta]).double().view(1, -1)
    best: tuple[float, str, float, float] | None = None
    for kind in ("nf4", "fp4") if transpose else ("nf4", "fp4", "int8"):
        w, d = (rows_w, rows_d) if kind == "int8" else (flat_w, flat_d)
        error = round_trip(w, QuantSpec(kind, PROBE_BLOCK, False, False)).double() - w.double()
        dot, energy = float(torch.sum(error * d)), float(torch.sum(error * error))
        if energy > 0.0 and dot >= 0.0 and (best is None or dot * dot / energy > best[0]):
            best = (dot * dot / energy, kind, dot / energy, energy * total / w.numel())
    if best is None:
        return None
    log.debug("quantisation probe: %s, coefficient %.3f", best[1], best[2])
    return QuantProbe(best[1], best[2], best[3])
