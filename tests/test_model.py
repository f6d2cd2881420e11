import pytest
import torch

from crystallm_core.model import GPT, KVCache, ModelConfig, named_config


def test_cached_decoding_matches_full_forward():
    """Logits from the key/value cache equal a full forward pass (float32, |diff| < 1e-4)."""
    torch.manual_seed(0)
    cfg = named_config("tiny", vocab_size=389, block_size=96)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 389, (3, 80))
    cache = KVCache(cfg, 3, 96, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        full, _ = model(idx)
        steps = [model.decode_step(idx[:, t], torch.full((3,), t), cache) for t in range(80)]
    assert torch.allclose(full, torch.stack(steps, 1), atol=1e-4, rtol=0)


def test_cached_decoding_with_sequences_at_different_positions():
    torch.manual_seed(1)
    cfg = named_config("tiny", vocab_size=50, block_size=64)
    model = GPT(cfg).eval()
    a, b = torch.randint(0, 50, (1, 30)), torch.randint(0, 50, (1, 20))
    cache = KVCache(cfg, 2, 64, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        # b starts 10 steps after a, so the two rows sit at different positions in every step
        for t in range(30):
            toks = torch.tensor([a[0, t], b[0, max(0, t - 10)]])
            pos = torch.tensor([t, max(0, t - 10)])
            out = model.decode_step(toks, pos, cache)
        full_a, _ = model(a)
        full_b, _ = model(b)
    assert torch.allclose(out[0], full_a[0, -1], atol=1e-4)
    assert torch.allclose(out[1], full_b[0, -1], atol=1e-4)


def test_fp8_cache_stays_close_to_full_precision_and_clamps_instead_of_nan():
    """An fp8 cache rounds keys and values (3 mantissa bits) but keeps the logits close; a value past the
    fp8 range is clamped, never stored as NaN."""
    torch.manual_seed(0)
    cfg = named_config("tiny", vocab_size=389, block_size=96)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 389, (3, 60))
    caches = [KVCache(cfg, 3, 96, torch.device("cpu"), d) for d in (torch.float32, torch.float8_e4m3fn)]
    with torch.no_grad():
        for t in range(60):
            ref, fp8 = (model.decode_step(idx[:, t], torch.full((3,), t), c) for c in caches)
    assert caches[1].k.dtype == torch.float8_e4m3fn
    assert (ref.softmax(-1) - fp8.softmax(-1)).abs().max() < 0.02
    assert not torch.equal(ref, fp8)  # the cache did round
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(1e4)  # keys and values far past 448
        out = model.decode_step(idx[:, 0], torch.zeros(3, dtype=torch.long), caches[1])
    assert torch.isfinite(out).all() and caches[1].k[0].float().abs().max() == 448


def test_named_configs_match_the_published_sizes():
    small = named_config("small", 389)
    large = named_config("large", 389)
    assert (small.n_layer, small.n_head, small.n_embd, small.block_size) == (8, 8, 512, 1024)
    assert (large.n_layer, large.n_head, large.n_embd, large.block_size) == (16, 16, 1024, 2048)
    assert 25e6 < GPT(small).num_params() < 27e6


def test_bad_model_configs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        named_config("huge", 389)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(vocab_size=10, n_layer=1, n_head=3, n_embd=8, block_size=8)
    with pytest.raises(ValueError, match="n_layer must be a positive integer"):
        ModelConfig(vocab_size=10, n_layer=0, n_head=1, n_embd=8, block_size=8)
    model = GPT(ModelConfig(vocab_size=10, n_layer=1, n_head=1, n_embd=8, block_size=8))
    with pytest.raises(ValueError, match="exceeds the context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_tied_embeddings():
    model = GPT(named_config("tiny", 389))
    assert model.head.weight.data_ptr() == model.tok_emb.weight.data_ptr()


def test_sampler_cache_type_choices():
    """auto keeps the model's type on a CPU (fp8 there is emulated, not faster) and picks fp8 on a GPU."""
    from crystallm_core.sampler import kv_cache_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert kv_cache_dtype("auto", cpu, torch.float32) == torch.float32
    assert kv_cache_dtype("auto", gpu, torch.bfloat16) == torch.float8_e4m3fn
    assert kv_cache_dtype("model", gpu, torch.bfloat16) == torch.bfloat16
    assert kv_cache_dtype("fp8", cpu, torch.float32) == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="kv_cache must be one of auto, model, fp8, got 'fp16'"):
        kv_cache_dtype("fp16", cpu, torch.float32)
