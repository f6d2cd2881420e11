"""A decoder-only transformer over CIF tokens.

Five pieces, read top to bottom: the config, causal self-attention, the MLP, the
pre-norm block, and the model. The model is written for one device; compiling,
autocast and CUDA graphs are applied from outside (train.py, sampler.py).

Attention has two paths. Training and scoring use ``forward`` over whole windows with
``scaled_dot_product_attention(is_causal=True)`` (flash attention on GPU). Generation
uses ``decode_step``: one new token per sequence, appended to a preallocated
key/value cache, each sequence at its own position.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from crystallm_core.kernels import decode_attention
from crystallm_core.registry import Registry


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # context length
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "dropout" and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"model config: {f.name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model config: dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


# Named sizes. `tiny` exists for CPU tests and the demo; its context still holds a whole CIF.
NAMED: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=128, block_size=1024),
    "small": dict(n_layer=8, n_head=8, n_embd=512, block_size=1024),
    "large": dict(n_layer=16, n_head=16, n_embd=1024, block_size=2048),
}


MODELS: Registry[dict[str, int]] = Registry("model")


def register_model(name: str, spec: dict[str, int], *, source: str = "", replace: bool = False) -> None:
    """Add a named size (ModelConfig keywords without vocab_size) for :func:`named_config`; plugins call this."""
    if {"vocab_size", "dropout"} & set(spec):
        raise ValueError(f"model {name!r}: vocab_size and dropout come from the data and the training config")
    ModelConfig(vocab_size=1, **spec)  # a bad spec fails where it is registered, naming the field
    MODELS.register(name, dict(spec), source=source, replace=replace)


for _name, _spec in NAMED.items():
    register_model(_name, _spec, source=__name__)


def named_config(name: str, vocab_size: int, dropout: float = 0.0, block_size: int | None = None) -> ModelConfig:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS.names())}")
    spec = dict(MODELS.get(name))
    if block_size is not None:
        spec["block_size"] = block_size
    return ModelConfig(vocab_size=vocab_size, dropout=dropout, **spec)


class KVCache:
    """Preallocated keys and values for ``batch`` sequences of up to ``length`` tokens, all layers.

    ``dtype`` may be narrower than the model's (``torch.float8_e4m3fn``): decoding reads the whole
    visible cache every step, so its bytes bound the speed; keys and values are stored unscaled,
    clamped to the fp8 range, and widened to float32 inside the attention kernel.
    """

    def __init__(self, cfg: ModelConfig, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.n_layer, batch, cfg.n_head, length, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = length


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # each (b, heads, t, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self._split(x)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per sequence: x (b, 1, c), written to the cache at ``pos`` (b,), attending to 0..pos."""
        b, _, c = x.shape
        q, k, v = self._split(x)
        y = decode_attention(q, k, v, k_cache, v_cache, pos)
        return self.proj(y.transpose(1, 2).reshape(b, 1, c))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.down = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm residual block: the residual stream is never normalized, which keeps deep stacks stable."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.decode(self.ln1(x), k_cache, v_cache, pos)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: the same matrix reads and writes tokens
        self.apply(self._init)
        # Scale the residual projections down with depth so the stream's variance does not grow per layer.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self, include_positions: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if include_positions else n - self.pos_emb.weight.numel()

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position of ``idx`` (b, t), and the mean cross-entropy if ``targets`` are given."""
        t = idx.shape[1]
        if t > self.cfg.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds the context of {self.cfg.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (b, vocab) of the next token after ``tokens`` (b,) sitting at positions ``pos`` (b,)."""
        x = self.tok_emb(tokens)[:, None, :] + self.pos_emb(pos)[:, None, :]
        for i, block in enumerate(self.blocks):
            x = block.decode(x, cache.k[i], cache.v[i], pos)
        return self.head(self.ln_f(x))[:, 0, :]

    def flops_per_token(self, context: int) -> float:
        """Training FLOPs per token: 6 per weight plus attention scores and values (forward + backward)."""
        cfg = self.cfg
        return 6.0 * self.num_params(include_positions=False) + 12.0 * cfg.n_layer * cfg.n_embd * context
