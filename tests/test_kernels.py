"""The Triton decode-attention kernel against dense masked attention (GPU only; CPU uses the dense path)."""

import pytest
import torch

from crystallm_core.kernels import FP8_MAX, decode_attention, dense_decode_attention, to_cache, triton

gpu = pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA and Triton")


@gpu
@pytest.mark.parametrize("cache", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("heads,length", [(8, 512), (16, 1000)])
def test_kernel_matches_dense_attention(heads, length, cache):
    torch.manual_seed(0)
    b, d = 37, 64
    q = torch.randn(b, heads, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, heads, length, d, device="cuda", dtype=torch.bfloat16).to(cache)
    v = torch.randn(b, heads, length, d, device="cuda", dtype=torch.bfloat16).to(cache)
    k_new, v_new = torch.randn(2, b, heads, 1, d, device="cuda", dtype=torch.bfloat16)
    k_new[0, 0, 0, 0] = 1000.0  # past the fp8 range: clamped like to_cache, never NaN
    pos = torch.randint(0, length, (b,), device="cuda")
    pos[0], pos[1] = 0, length - 1
    k_ref, v_ref = k.clone(), v.clone()
    rows = torch.arange(b, device="cuda")
    k_ref[rows, :, pos] = to_cache(k_new[:, :, 0], cache)
    v_ref[rows, :, pos] = to_cache(v_new[:, :, 0], cache)
    ref = dense_decode_attention(q.float(), k_ref.float(), v_ref.float(), pos)
    out = decode_attention(q, k_new, v_new, k, v, pos)
    assert torch.equal(k.float(), k_ref.float()) and torch.equal(v.float(), v_ref.float())  # stored as the cache's type
    assert (out.float() - ref).abs().max() < 2e-2
    if cache == torch.float8_e4m3fn:
        assert k[0, 0, 0, 0].float() == FP8_MAX


def test_dense_fallback_ignores_positions_past_each_row():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 6, 4), torch.randn(2, 1, 6, 4)
    pos = torch.tensor([2, 5])
    out = dense_decode_attention(q, k, v, pos)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 3:] = 99.0  # garbage beyond row 0's position must not matter
    v2[0, :, 3:] = 99.0
    assert torch.allclose(dense_decode_attention(q, k2, v2, pos)[0], out[0])


def test_decode_attention_stores_the_new_key_and_value_then_attends_to_them():
    torch.manual_seed(0)
    q, k_new, v_new = torch.randn(3, 2, 1, 1, 4)
    k_cache, v_cache = torch.randn(2, 2, 1, 6, 4)
    pos = torch.tensor([0, 4])
    out = decode_attention(q, k_new, v_new, k_cache, v_cache, pos)
    assert torch.equal(k_cache[1, 0, 4], k_new[1, 0, 0]) and torch.equal(v_cache[0, 0, 0], v_new[0, 0, 0])
    assert torch.allclose(out[0], v_new[0])  # position 0 sees only itself


@gpu
def test_graph_captured_and_compiled_sampler_matches_eager_sampler():
    from crystallm_core.model import GPT, named_config
    from crystallm_core.sampler import Sampler, SamplingParams
    from crystallm_core.vocab import get_vocab

    torch.manual_seed(0)
    model = GPT(named_config("tiny", 389, block_size=128)).cuda().to(torch.bfloat16).eval()
    prompts = [[5, 10 + i % 7, 20] for i in range(40)]

    def run(fast: bool, temperature: float, seed: int = 0) -> list[list[int]]:
        sampler = Sampler(model, get_vocab(), batch_size=16, max_len=128, check_every=8, cuda_graph=fast, compile=fast)
        params = SamplingParams(temperature=temperature, top_k=5, max_tokens=100, seed=seed)
        return sampler.generate(prompts, params)[0]

    assert run(False, 0.0) == run(True, 0.0)  # greedy: the same tokens either way
    assert run(True, 1.0) == run(True, 1.0)  # sampling: reproducible by seed through graph replays
    assert run(True, 1.0) != run(True, 1.0, seed=1)
