"""Exact dtype conversions shared by the kernels.

Triton's interpreter (``TRITON_INTERPRET=1``) converts bfloat16 <-> float32 with its own bit
arithmetic, which truncates instead of rounding to nearest-even and flushes subnormals to zero.
Compiled Triton uses the hardware conversions, which are exact. To make both paths produce the
same bits, bfloat16 is converted here with integer operations that behave identically in the
interpreter and on the GPU. Every other dtype uses the ordinary cast, which already agrees.
"""

import triton
import triton.language as tl


@triton.jit
def upcast(value, acc_dtype: tl.constexpr):
    """Widen ``value`` to ``acc_dtype`` without rounding (bf16/fp16/fp32 -> fp32, fp64 -> fp64)."""
    if value.dtype == tl.bfloat16:
        # A bfloat16 is the upper half of the float32 with the same value.
        bits = value.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return value.to(acc_dtype)


@triton.jit
def round_to(value, dtype: tl.constexpr):
    """Round ``value`` (fp32 or fp64) to ``dtype`` to nearest, ties to even, as torch does."""
    if dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        # Adding 0x7FFF plus the lowest kept bit, then dropping the low half, is round-to-nearest
        # with ties to even; the carry moves into the exponent, so overflow becomes inf.
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # A NaN whose payload sits only in the dropped half would turn into inf: use a quiet NaN.
        rounded = tl.where(value != value, 0x7FC00000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(dtype)


@triton.jit
def sqrt_rn(value, IS_FP64: tl.constexpr):
    """Correctly rounded square root (``tl.sqrt`` is approximate for fp32 on the GPU)."""
    if IS_FP64:
        return tl.sqrt(value)
    else:
        return tl.sqrt_rn(value)


@triton.jit
def div_rn(numerator, denominator, IS_FP64: tl.constexpr):
    """Correctly rounded division (fp32 ``/`` compiles to an approximate division on the GPU)."""
    if IS_FP64:
        return numerator / denominator
    else:
        return tl.math.div_rn(numerator, denominator)
