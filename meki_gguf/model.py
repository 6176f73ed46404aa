"""The MeKi causal LM in PyTorch: the reference of every parity test, and the transformers model.

A Qwen3-shaped decoder (GQA, rotate-half RoPE, SwiGLU, RMSNorm, optional QK-norm, tied or untied
output) whose layers carry a MeKi memory branch beside the FFN (the method: docs/METHOD.md).
`MekiConfig`/`MekiForCausalLM` are transformers classes (registered with the Auto classes when
meki_gguf is imported), so this one file is both the arbiter and what
`AutoModelForCausalLM.from_pretrained` builds: the math cannot diverge between the two. The
module names are the Hugging Face-style checkpoint layout (docs/FORMAT.md): `state_dict()` *is*
that layout, in training form or, after `fold()`, in folded form (one table per layer).
The memory formula itself is llama.cpp's converter's (`fold.memory_expert`): one implementation
for the training-form forward here and for the fold into GGUF.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# fold (llama.cpp's conversion package) is imported where it is used: importing transformers
# registers this module (meki_gguf/__init__.py), and conversion.base imports transformers before it
# has defined what conversion.meki needs: a module-level import here would close that cycle


@dataclass(init=False, repr=False, eq=False)   # dataclass: fields()/replace() of the MeKi hyperparameters
class MekiConfig(PretrainedConfig):
    model_type = "meki"
    # transformers' standard names read (and write) these fields, as GPT-2's config does
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "intermediate_size": "d_ff",
                     "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps",
                     "tie_word_embeddings": "tied"}

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
    # G_l normalizes its input, the word embedding row, with its own RMSNorm weight: true for
    # Megatron-LM's Transformer Engine spec (the released script), whose G_l is built from the
    # TE MLP spec with the norm fused into its first linear; false for the local spec
    dyn_norm: bool = False
    max_seq_len: int = 4096
    # True: the memory is stored folded, one table T_l [V, m] per layer (docs/METHOD.md)
    folded: bool = False

    def __init__(self, vocab_size=512, n_layer=2, d_model=64, d_mem=16, d_ff=128, n_head=4, n_kv_head=2,
                 head_dim=16, rope_theta=500000.0, norm_eps=1e-6, qk_norm=False, tied=True,
                 dyn_norm=False, max_seq_len=4096, folded=False, **kwargs):
        if kwargs.pop("gate_on_residual", False):
            from .fold import LEGACY_GATE
            raise ValueError(LEGACY_GATE)
        super().__init__(**kwargs)          # sets tie_word_embeddings (= tied) to its default: set ours after
        self.vocab_size, self.n_layer, self.d_model, self.d_mem, self.d_ff = vocab_size, n_layer, d_model, d_mem, d_ff
        self.n_head, self.n_kv_head, self.head_dim, self.rope_theta = n_head, n_kv_head, head_dim, rope_theta
        self.norm_eps, self.qk_norm, self.tied, self.dyn_norm = norm_eps, qk_norm, tied, dyn_norm
        self.max_seq_len, self.folded = max_seq_len, folded

    @property
    def d_dyn(self) -> int:          # hidden width of G: d/2
        return self.d_model // 2


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
    def __init__(self, c: MekiConfig, layer_idx: int):
        super().__init__()
        self.c, self.layer_idx = c, layer_idx
        self.q_proj = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None

    def forward(self, x, pos, cache=None):
        """pos: [T] absolute positions; cache: a transformers Cache holding the earlier positions."""
        c, (B, T, _) = self.c, x.shape
        q = self.q_proj(x).view(B, T, c.n_head, c.head_dim)
        k = self.k_proj(x).view(B, T, c.n_kv_head, c.head_dim)
        v = self.v_proj(x).view(B, T, c.n_kv_head, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        rep = c.n_head // c.n_kv_head
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if k.shape[2] == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:                        # after cached positions: query i sees keys 0..pos[i]
            mask = torch.arange(k.shape[2])[None, :] <= pos[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MemoryBranch(nn.Module):
    """MeKi's memory branch. Training form: e = alpha * RMSNorm_mix(M[x] + beta * G(E[x]));
    folded form: e = T[x], a plain lookup (`fold()`)."""

    def __init__(self, c: MekiConfig):
        super().__init__()
        if c.folded:
            self.table = nn.Parameter(torch.zeros(c.vocab_size, c.d_mem))        # T_l
        else:
            self.table = None
            self.memory = nn.Embedding(c.vocab_size, c.d_mem)                    # M_l (static)
            self.dyn = SwiGLU(c.d_model, c.d_dyn, c.d_mem,                       # G_l (dynamic)
                              norm_eps=c.norm_eps if c.dyn_norm else None)
            self.mix_norm = RMSNorm(c.d_mem, c.norm_eps)
            self.alpha = nn.Parameter(torch.ones(()))
            self.beta = nn.Parameter(torch.ones(()))
        self.gate_proj = nn.Linear(c.d_model, c.d_mem, bias=False)          # W_gate
        self.out_proj = nn.Linear(c.d_mem, c.d_model, bias=False)           # W_out
        self.post_norm = RMSNorm(c.d_model, c.norm_eps)

    def expert(self, ids, E):
        """The expert vector of token ids (E: the word embedding)."""
        if self.table is not None:
            return self.table[ids]
        from .fold import memory_expert
        dyn = self.dyn
        return memory_expert(self.memory(ids), E[ids], dyn.gate_proj.weight, dyn.up_proj.weight,
                             dyn.down_proj.weight, self.mix_norm.weight, self.alpha, self.beta,
                             self.mix_norm.eps, dyn.norm.weight if dyn.norm is not None else None)

    def forward(self, ids, E, h):
        v = self.expert(ids, E).to(h.dtype) + torch.sigmoid(self.gate_proj(h))     # additive-sigmoid fusion
        return self.post_norm(self.out_proj(v))

    def fold_into(self, table: torch.Tensor) -> None:
        """Become the folded form with T_l = table [V, m]: the training-form parameters go."""
        for name in ("memory", "dyn", "mix_norm", "alpha", "beta"):
            delattr(self, name)
        self.table = nn.Parameter(table.to(self.gate_proj.weight.dtype).contiguous())


class Block(nn.Module):
    def __init__(self, c: MekiConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.d_model, c.norm_eps)
        self.self_attn = Attention(c, layer_idx)
        self.post_attention_layernorm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c.d_model, c.d_ff, c.d_model)
        self.meki = MemoryBranch(c)

    def forward(self, x, ids, E, pos, cache=None):
        A = x + self.self_attn(self.input_layernorm(x), pos, cache)
        H = self.post_attention_layernorm(A)
        return A + self.mlp(H) + self.meki(ids, E, H)   # memory parallel to the FFN; both see H


class MekiModel(nn.Module):
    def __init__(self, c: MekiConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.norm = RMSNorm(c.d_model, c.norm_eps)


class MekiPreTrainedModel(PreTrainedModel):
    config_class = MekiConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)
        elif isinstance(module, MemoryBranch) and module.table is None:
            module.alpha.data.fill_(1.0)
            module.beta.data.fill_(1.0)


class MekiForCausalLM(MekiPreTrainedModel, GenerationMixin):
    def __init__(self, c: MekiConfig):
        super().__init__(c)
        self.model = MekiModel(c)
        self.lm_head = None if c.tied else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head           # None when tied: the logits use the embedding itself

    def hidden_states(self, ids, pos=None, cache=None):
        """ids: [B, T] -> the final normed hidden states [B, T, d] (llama.cpp's embeddings).
        pos: the positions of ids (default 0..T-1); cache: a transformers Cache."""
        E = self.model.embed_tokens.weight
        x = E[ids]
        pos = torch.arange(ids.shape[1]) if pos is None else pos
        for blk in self.model.layers:
            x = blk(x, ids, E, pos, cache)
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None,
                cache_position=None, labels=None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids: [B, T] -> logits [B, T, V] (float32 or the module's dtype) in `.logits`.
        Batches are unpadded: an attention_mask with zeros is refused."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("MekiForCausalLM does not take padded batches (attention_mask with zeros)")
        if use_cache and past_key_values is None:
            from transformers import DynamicCache
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        pos = cache_position if cache_position is not None else torch.arange(past, past + input_ids.shape[1])
        W = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = self.hidden_states(input_ids, pos, past_key_values) @ W.T
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)

    @torch.no_grad()
    def fold(self) -> None:
        """Re-parameterize every layer in place into its lookup table T_l (float64 math, then the
        model's dtype); the config becomes `folded` (a copy: configs are often shared)."""
        if self.config.folded:
            return
        from .fold import fold_rows
        c = self.config
        T = fold_rows(self.state_dict().__getitem__, 0, c.vocab_size, c.n_layer, c.norm_eps, folded=False,
                      dyn_norm=c.dyn_norm, dtype=torch.float64)
        for il, blk in enumerate(self.model.layers):
            blk.meki.fold_into(T[:, il * c.d_mem:(il + 1) * c.d_mem])
        self.config = copy.deepcopy(c)
        self.config.folded = True

    @torch.no_grad()
    def generate_greedy(self, ids: list[int], n: int) -> list[int]:
        """n greedy tokens, each from a full forward pass (no cache: the plainest reference)."""
        out = list(ids)
        for _ in range(n):
            logits = self(torch.tensor([out])).logits
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


# model_type "meki" for transformers' Auto classes (importing meki_gguf sees that this module is
# imported once transformers is)
AutoConfig.register(MekiConfig.model_type, MekiConfig, exist_ok=True)
AutoModelForCausalLM.register(MekiConfig, MekiForCausalLM, exist_ok=True)
