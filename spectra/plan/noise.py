"""The storage-rounding floor: the expected energy that rounding a tensor to its storage dtype adds to ΔW."""

from __future__ import annotations

from typing import Final

import torch

# mantissa bits (with the implicit one) of storage formats whose rounding noise we estimate; f32/f64 count as exact
MANTISSA_BITS: Final = {"bf16": 8, "f16": 11, "f8_e4m3": 4, "f8_e5m2": 3}
# storage dtype -> (mantissa field width, exponent mask, exponent bias)
_EXPONENT_FIELDS: Final = {"bf16": (7, 0xFF, 127), "f16": (10, 0x1F, 15)}


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
