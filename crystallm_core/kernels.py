"""Attention of one new token per sequence over a key/value cache, reading only the filled part.

Decoding is limited by memory bandwidth, and the cache is most of the bytes: sequences
in a continuous batch sit at very different positions, so a dense masked attention
over the whole cache would read several times what is needed. The Triton kernel runs
one program per (sequence, head) and stops at that sequence's own length, with an
online softmax in float32. Without CUDA or Triton the masked dense attention is used;
the two agree to bf16 rounding (tests/test_kernels.py on GPU, the fallback on CPU).
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


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """q (b, h, 1, d); k, v (b, h, T, d); row i attends to cache positions 0..pos[i].

    On the CPU the cache is cut at the furthest position in use (a host read, which is cheap
    there); on a GPU the cut would stall graph capture, and the Triton kernel is used instead.
    """
    if not q.is_cuda:
        end = int(pos.max()) + 1
        k, v = k[:, :, :end], v[:, :, :end]
    visible = torch.arange(k.shape[2], device=q.device)[None, :] <= pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :])


if triton is not None:

    @triton.jit
    def _decode_kernel(
        Q, K, V, POS, OUT,
        sqb, sqh, skb, skh, skt, sob, soh,
        scale_log2,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        h = tl.program_id(1)
        n = tl.load(POS + b).to(tl.int32) + 1
        d = tl.arange(0, D)
        # The cast keeps the loop-carried types fp32 when inductor passes the scale as fp64.
        q = (tl.load(Q + b * sqb + h * sqh + d).to(tl.float32) * scale_log2).to(tl.float32)
        k_base = K + b * skb + h * skh
        v_base = V + b * skb + h * skh
        m = tl.full((), float("-inf"), tl.float32)
        l_sum = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for start in range(0, n, BLOCK):
            t = start + tl.arange(0, BLOCK)
            valid = t < n
            offs = t[:, None] * skt + d[None, :]
            k = tl.load(k_base + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.where(valid, tl.sum(k * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            p = tl.exp2(s - m_new)
            alpha = tl.exp2(m - m_new)
            v = tl.load(v_base + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            l_sum = l_sum * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m = m_new
        tl.store(OUT + b * sob + h * soh + d, (acc / l_sum).to(OUT.dtype.element_ty))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`dense_decode_attention`, through the Triton kernel on CUDA."""
    if triton is None or not q.is_cuda:
        return dense_decode_attention(q, k, v, pos)
    b, h, _, d = q.shape
    if k.stride(3) != 1 or q.stride(3) != 1:
        raise ValueError("decode_attention needs the head dimension contiguous")
    out = torch.empty((b, h, 1, d), device=q.device, dtype=q.dtype)
    scale_log2 = (1.0 / math.sqrt(d)) * 1.4426950408889634  # exp(x) = exp2(x * log2 e)
    _decode_kernel[(b, h)](
        q, k, v, pos, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), out.stride(0), out.stride(1),
        scale_log2, D=d, BLOCK=64,
    )  # fmt: skip
    return out
