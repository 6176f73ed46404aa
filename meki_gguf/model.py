"""PyTorch reference of a MeKi causal LM: the arbiter of every parity test.

A Qwen3-shaped decoder (GQA, rotate-half RoPE, SwiGLU, RMSNorm, optional QK-norm,
tied or untied output) whose layers carry a MeKi memory branch beside the FFN.
Names follow ../shared/MEKI.md. The module names double as the Hugging Face-style
checkpoint layout (docs/FORMAT.md): `state_dict()` *is* that layout.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MekiConfig:
    vocab_size: int = 512            # V (padded)
    n_layer: int = 2                 # L
    d_model: int = 64                # d
    d_mem: int = 16                  # m
    d_ff: int = 128                  # FFN width
    n_head: int = 4
    n_kv_head: int = 2
    head_dim: int = 16
    rope_theta: float = 500000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False
    tied: bool = True
    # False: the paper's gate, sigmoid(W_gate . RMSNorm_ffn(A)).
    # True: Megatron-LM with Transformer Engine: the gate sees the raw residual A,
    # and the dynamic projection G has its own RMSNorm on its input.
    gate_on_residual: bool = False
    max_seq_len: int = 4096

    @property
    def d_dyn(self) -> int:          # hidden width of G: d/2
        return self.d_model // 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MekiConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown MeKi config keys: {sorted(unknown)}")
        return cls(**d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); `norm` is TE's RMSNorm fused into the first linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, norm_eps: float | None = None):
        super().__init__()
        self.norm = RMSNorm(d_in, norm_eps) if norm_eps is not None else None
        self.gate_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_in, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        if self.norm is not None:
            x = self.norm(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope(x, pos, theta: float):
    """Rotate-half ("NEOX") RoPE over the last dim; x: [B, H, T, hd], pos: [T]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos.to(torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, c: MekiConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None

    def forward(self, x, pos):
        c, (B, T, _) = self.c, x.shape
        q = self.q_proj(x).view(B, T, c.n_head, c.head_dim)
        k = self.k_proj(x).view(B, T, c.n_kv_head, c.head_dim)
        v = self.v_proj(x).view(B, T, c.n_kv_head, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta)
        rep = c.n_head // c.n_kv_head
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MemoryBranch(nn.Module):
    """MeKi's memory branch. Training form: e = alpha * RMSNorm_mix(M[x] + beta * G(E[x])).
    After `fold()` the expert vector is a plain lookup: e = T[x]."""

    def __init__(self, c: MekiConfig):
        super().__init__()
        self.memory = nn.Embedding(c.vocab_size, c.d_mem)                    # M_l (static)
        self.dyn = SwiGLU(c.d_model, c.d_dyn, c.d_mem,                       # G_l (dynamic)
                          norm_eps=c.norm_eps if c.gate_on_residual else None)
        self.mix_norm = RMSNorm(c.d_mem, c.norm_eps)
        self.alpha = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.ones(()))
        self.gate_proj = nn.Linear(c.d_model, c.d_mem, bias=False)          # W_gate
        self.out_proj = nn.Linear(c.d_mem, c.d_model, bias=False)           # W_out
        self.post_norm = RMSNorm(c.d_model, c.norm_eps)
        self.table: torch.Tensor | None = None                              # T_l once folded

    def expert(self, ids, E):
        """Training form of the expert vector for token ids (E: the word embedding)."""
        return self.alpha * self.mix_norm(self.memory(ids) + self.beta * self.dyn(E[ids]))

    def forward(self, ids, E, h):
        e = self.table[ids].to(h.dtype) if self.table is not None else self.expert(ids, E)
        v = e + torch.sigmoid(self.gate_proj(h))     # additive-sigmoid fusion
        return self.post_norm(self.out_proj(v))


class Block(nn.Module):
    def __init__(self, c: MekiConfig):
        super().__init__()
        self.gate_on_residual = c.gate_on_residual
        self.input_layernorm = RMSNorm(c.d_model, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c.d_model, c.d_ff, c.d_model)
        self.meki = MemoryBranch(c)

    def forward(self, x, ids, E, pos):
        A = x + self.self_attn(self.input_layernorm(x), pos)
        H = self.post_attention_layernorm(A)
        h = A if self.gate_on_residual else H
        return A + self.mlp(H) + self.meki(ids, E, h)   # memory parallel to the FFN


class MekiModel(nn.Module):
    def __init__(self, c: MekiConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.d_model, c.norm_eps)


class MekiForCausalLM(nn.Module):
    def __init__(self, c: MekiConfig):
        super().__init__()
        self.config = c
        self.model = MekiModel(c)
        self.lm_head = None if c.tied else nn.Linear(c.d_model, c.vocab_size, bias=False)

    def hidden_states(self, ids):
        """ids: [B, T] -> the final normed hidden states [B, T, d] (llama.cpp's embeddings)."""
        E = self.model.embed_tokens.weight
        x = E[ids]
        pos = torch.arange(ids.shape[1])
        for blk in self.model.layers:
            x = blk(x, ids, E, pos)
        return self.model.norm(x)

    def forward(self, ids):
        """ids: [B, T] -> logits [B, T, V] (float32 or the module's dtype)."""
        W = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.hidden_states(ids) @ W.T

    @torch.no_grad()
    def fold(self, chunk: int = 4096) -> None:
        """Re-parameterize every layer into its lookup table T_l (float64 math)."""
        from .fold import fold_layer
        E = self.model.embed_tokens.weight
        for blk in self.model.layers:
            blk.meki.table = fold_layer(blk.meki, E, chunk=chunk)

    @torch.no_grad()
    def generate_greedy(self, ids: list[int], n: int) -> list[int]:
        out = list(ids)
        for _ in range(n):
            logits = self(torch.tensor([out]))
            out.append(int(logits[0, -1].argmax()))
        return out[len(ids):]


def init_random(c: MekiConfig, seed: int = 0, dtype=torch.float32) -> MekiForCausalLM:
    """A random model with non-trivial norms, alpha and beta (so a wrong fold shows)."""
    g = torch.Generator().manual_seed(seed)
    m = MekiForCausalLM(c)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".alpha"):
                p.fill_(0.5 + torch.rand((), generator=g).item())
            elif name.endswith(".beta"):
                p.fill_(0.3 + torch.rand((), generator=g).item())
            elif p.dim() == 2:
                std = 0.02 if "embed_tokens" in name or "memory" in name else 1.0 / math.sqrt(p.shape[1])
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m.to(dtype)
