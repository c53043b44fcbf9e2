"""The Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral, SmolLM) over a paged KV pool.

Numerically it follows transformers' implementation step for step (RMSNorm in float32, RoPE with
cos/sin computed in float32 then cast, SiLU-gated MLP), so fp32 logits agree to ~1e-6. Q/K/V and
gate/up projections are fused into one matmul each; ``checkpoint_targets`` maps the checkpoint's
separate tensors onto row slices of the fused weights.

Parameters are created with ``torch.empty`` (no random init: the weights are loaded right after),
so build the model under ``with torch.device(device):`` to allocate it in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from workers.executor.attention import AttentionMetadata, PagedAttention, TorchPagedAttention
from workers.model_config import ModelConfig, RopeConfig

Targets = dict[str, torch.Tensor]


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def checkpoint_targets(self, names: list[str], sizes: list[int]) -> Targets:
        """Checkpoint tensors ``names[i] + ".weight"`` (and ``.bias``) fill consecutive row ranges."""
        targets = dict(zip([name + ".weight" for name in names], self.weight.detach().split(sizes)))
        if self.bias is not None:
            targets.update(zip([name + ".bias" for name in names], self.bias.detach().split(sizes)))
        return targets


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the model dtype, as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Per-pair rotation frequencies (float32, CPU), with linear or llama3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        # Llama 3.1: stretch long wavelengths by `factor`, keep short ones, blend in between.
        old_context = rope.original_max_position_embeddings
        low_freq_wavelen = old_context / rope.low_freq_factor
        high_freq_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]`` (half-split layout) by ``cos``/``sin`` ``[T, 1, head_dim]``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype, backend: PagedAttention) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.sliding_window = config.layer_sliding_windows[layer]
        self.backend = backend
        self.sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        self.qkv_proj = Linear(config.hidden_size, sum(self.sizes), config.qkv_bias, dtype)
        self.o_proj = Linear(self.sizes[0], config.hidden_size, config.o_proj_bias, dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        pool: torch.Tensor,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.sizes, dim=-1)
        q = apply_rope(q.unflatten(-1, (self.num_heads, self.head_dim)), cos, sin)
        k = apply_rope(k.unflatten(-1, (self.num_kv_heads, self.head_dim)), cos, sin)
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        stream = meta.stream
        if stream is not None:
            # NOTE: wait for this layer's host blocks to be staged before writing into their pages:
            # the staging copy would otherwise overwrite the new K/V.
            stream.before_attention(self.layer)
        # NOTE: write before attend, so the new tokens see themselves through the pages.
        self.backend.write_kv(pool, k, v, meta.slot_pages(self.layer), meta)
        out = self.backend.attend(q, pool, meta.page_table(self.layer), meta, self.sliding_window)
        if stream is not None:
            # NOTE: the staging area is read (and written) only above: it may now be written back
            # and refilled for a later layer.
            stream.after_attention(self.layer)
        return self.o_proj(out.flatten(1))

    def checkpoint_targets(self, prefix: str) -> Targets:
        qkv = self.qkv_proj.checkpoint_targets(
            [prefix + name for name in ("q_proj", "k_proj", "v_proj")], self.sizes
        )
        return qkv | self.o_proj.checkpoint_targets([prefix + "o_proj"], [self.o_proj.weight.shape[0]])


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, config.mlp_bias, dtype)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, config.mlp_bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def checkpoint_targets(self, prefix: str) -> Targets:
        gate_up = self.gate_up_proj.checkpoint_targets(
            [prefix + "gate_proj", prefix + "up_proj"], [self.intermediate_size] * 2
        )
        return gate_up | self.down_proj.checkpoint_targets(
            [prefix + "down_proj"], [self.down_proj.weight.shape[0]]
        )


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype, backend: PagedAttention) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, layer, dtype, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        pool: torch.Tensor,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, meta, pool)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def checkpoint_targets(self, prefix: str) -> Targets:
        return (
            {
                prefix + "input_layernorm.weight": self.input_layernorm.weight.detach(),
                prefix + "post_attention_layernorm.weight": self.post_attention_layernorm.weight.detach(),
            }
            | self.self_attn.checkpoint_targets(prefix + "self_attn.")
            | self.mlp.checkpoint_targets(prefix + "mlp.")
        )


class CausalLM(nn.Module):
    """Token ids of one step in, logits of the rows that are sampled out."""

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, backend: PagedAttention | None = None
    ) -> None:
        super().__init__()
        backend = backend or TorchPagedAttention()
        self.config = config
        embedding = torch.empty(config.vocab_size, config.hidden_size, dtype=dtype)
        self.embed_tokens = nn.Parameter(embedding, requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype, backend) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, False, dtype)
        )
        inv_freq = rope_inverse_frequencies(config.rope, config.head_dim).to(self.embed_tokens.device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        pool: torch.Tensor,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """``input_ids``/``positions`` ``[T]`` -> float32 logits ``[len(logits_indices), vocab]``.

        Every token's K/V is written to ``pool``; only the rows in ``logits_indices`` go through
        the final norm and lm_head (the other rows' logits would be thrown away).
        """
        cos, sin = self.rope_cos_sin(positions, self.embed_tokens.dtype)
        hidden = F.embedding(input_ids, self.embed_tokens)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, meta, pool)
        hidden = self.norm(hidden[logits_indices])
        head = self.embed_tokens if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, head).float()

    def rope_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, 1, head_dim]`` cos and sin, computed once per step for all layers (float32, then cast)."""
        angles = positions[:, None].float() * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def checkpoint_targets(self) -> Targets:
        """Checkpoint tensor name -> the (view of the) parameter it is loaded into."""
        targets = {
            "model.embed_tokens.weight": self.embed_tokens.detach(),
            "model.norm.weight": self.norm.weight.detach(),
        }
        if self.lm_head is not None:
            targets["lm_head.weight"] = self.lm_head.weight.detach()
        for i, layer in enumerate(self.layers):
            targets |= layer.checkpoint_targets(f"model.layers.{i}.")
        return targets
