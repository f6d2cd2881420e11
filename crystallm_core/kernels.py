"""Attention of one new token per sequence over a key/value cache, reading only the filled part.

Decoding is limited by memory bandwidth, and the cache is most of the bytes: sequences
in a continuous batch sit at very different positions, so a dense masked attention
over the whole cache would read several times what is needed. The Triton kernel runs
one program per (sequence, head), first stores the new key and value at the sequence's
position (one kernel instead of two indexed writes per layer), then reads only that
sequence's filled positions, with an online softmax in float32. The cache may be fp8
(e4m3, unscaled, clamped), which halves the bytes read; values are widened to float32
in registers. Without CUDA or Triton an indexed write and the masked dense attention are
used; the two agree to rounding (tests/test_kernels.py on GPU, the fallback on CPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


FP8_MAX = 448.0  # the largest finite float8_e4m3fn value
FP8_LIMIT = tl.constexpr(FP8_MAX) if triton is not None else FP8_MAX


def to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in a cache of ``dtype``: a narrower fp8 cache stores values unscaled, clamped to its range
    (the cast alone would turn them into NaN)."""
    if x.dtype == dtype:
        return x
    if dtype == torch.float8_e4m3fn:
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """q (b, h, 1, d); k, v (b, h, T, d); row i attends to cache positions 0..pos[i].

    On the CPU the cache is cut at the furthest position in use (a host read, which is cheap
    there); on a GPU the cut would stall graph capture, and the Triton kernel is used instead.
    """
    if not q.is_cuda:
        end = int(pos.max()) + 1
        k, v = k[:, :, :end], v[:, :, :end]
    k, v = k.to(q.dtype), v.to(q.dtype)  # a narrower (fp8) cache is widened to the query's type
    visible = torch.arange(k.shape[2], device=q.device)[None, :] <= pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :])


if triton is not None:

    @triton.jit
    def _decode_kernel(
        Q, KN, VN, K, V, POS, OUT,
        sqb, sqh, snb, snh, skb, skh, skt, sob, soh,
        scale_log2,
        FP8: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        h = tl.program_id(1)
        p = tl.load(POS + b).to(tl.int32)  # the new token's position; the cache holds 0..p-1
        d = tl.arange(0, D)
        k_base = K + b * skb + h * skh
        v_base = V + b * skb + h * skh
        # Store the new key and value in the cache's type, and attend to them as stored, so this
        # step sees exactly what later steps will read back.
        kn = tl.load(KN + b * snb + h * snh + d).to(tl.float32)
        vn = tl.load(VN + b * snb + h * snh + d).to(tl.float32)
        if FP8:  # the cast gives NaN past the fp8 range: clamp as to_cache does
            kn = tl.minimum(tl.maximum(kn, -FP8_LIMIT), FP8_LIMIT)
            vn = tl.minimum(tl.maximum(vn, -FP8_LIMIT), FP8_LIMIT)
        kn = kn.to(K.dtype.element_ty)
        vn = vn.to(V.dtype.element_ty)
        tl.store(k_base + p * skt + d, kn)
        tl.store(v_base + p * skt + d, vn)
        # The cast keeps the loop-carried types fp32 when inductor passes the scale as fp64.
        q = (tl.load(Q + b * sqb + h * sqh + d).to(tl.float32) * scale_log2).to(tl.float32)
        m = tl.sum(kn.to(tl.float32) * q, 0)  # the new token's score starts the online softmax
        l_sum = tl.full((), 1.0, tl.float32)
        acc = vn.to(tl.float32)
        for start in range(0, p, BLOCK):
            t = start + tl.arange(0, BLOCK)
            valid = t < p
            offs = t[:, None] * skt + d[None, :]
            k = tl.load(k_base + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.where(valid, tl.sum(k * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            prob = tl.exp2(s - m_new)
            alpha = tl.exp2(m - m_new)
            v = tl.load(v_base + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            l_sum = l_sum * alpha + tl.sum(prob, 0)
            acc = acc * alpha + tl.sum(prob[:, None] * v, 0)
            m = m_new
        tl.store(OUT + b * sob + h * soh + d, (acc / l_sum).to(OUT.dtype.element_ty))


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Store each row's new key and value (b, h, 1, d) in the caches (b, h, T, d) at ``pos`` (b,), then
    attend with q (b, h, 1, d) to positions 0..pos. One fused Triton kernel on CUDA; on the CPU an
    indexed write and :func:`dense_decode_attention`."""
    b, h, _, d = q.shape
    if triton is None or not q.is_cuda:
        rows = torch.arange(b, device=q.device)
        k_cache[rows, :, pos] = to_cache(k[:, :, 0], k_cache.dtype)
        v_cache[rows, :, pos] = to_cache(v[:, :, 0], v_cache.dtype)
        return dense_decode_attention(q, k_cache, v_cache, pos)
    if k_cache.stride(3) != 1 or q.stride(3) != 1 or k.stride(3) != 1 or k.stride() != v.stride():
        raise ValueError("decode_attention needs the head dimension contiguous and k, v laid out alike")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("decode_attention needs the key and value caches laid out alike")
    out = torch.empty((b, h, 1, d), device=q.device, dtype=q.dtype)
    scale_log2 = (1.0 / math.sqrt(d)) * 1.4426950408889634  # exp(x) = exp2(x * log2 e)
    # One warp per (sequence, head) and 32 positions per iteration: the fastest of the block sizes
    # (16-128) and warp counts (1-8) measured on an H100 for bf16 and fp8 caches (docs/BENCHMARKS.md).
    _decode_kernel[(b, h)](
        q, k, v, k_cache, v_cache, pos, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        scale_log2, FP8=k_cache.dtype == torch.float8_e4m3fn, D=d, BLOCK=32, num_warps=1,
    )  # fmt: skip
    return out
