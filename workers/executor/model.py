"""The Llama-family decoder over a paged KV pool: Llama 2/3, Qwen2/2.5/3, Mistral, Gemma 3 (text),
Phi-3/4, SmolLM 1-3.

Numerically it follows transformers' implementation step for step (RMSNorm in float32, RoPE with
cos/sin computed in float32 then cast, gated MLP), so fp32 logits agree to ~1e-6. Q/K/V and
gate/up projections are fused into one matmul each; ``checkpoint_targets`` maps the checkpoint's
separate tensors onto row slices of the fused weights (Phi-3's checkpoints are fused already).
The architectures differ only by ``ModelConfig``'s switches, read in the constructors: q/k norms,
Gemma's (1 + w) norms, sandwich norms and scaled embeddings, the MLP activation, each layer's rope
(or none), the attention scale and the final logit soft-cap.

Parameters are created with ``torch.empty`` (no random init: the weights are loaded right after),
so build the model under ``with torch.device(device):`` to allocate it in place.

Tensor parallelism (:mod:`workers.executor.parallel`): built with a ``TensorParallel`` of size N, the
model holds one rank's shard (its query and KV heads, its slice of the MLP and of the vocabulary) and
its checkpoint targets name only the slices that rank reads.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from workers.executor.attention import AttentionMetadata, PagedAttention, TorchPagedAttention
from workers.executor.parallel import SINGLE, ShardedTarget, TensorParallel
from workers.model_config import ModelConfig, RopeConfig

# Checkpoint tensor name -> the parameter (view) it fills, or the slices of it this rank holds.
Targets = dict[str, torch.Tensor | ShardedTarget]
RowRange = tuple[str, int, int, int]  # checkpoint name, its full number of rows, [start, stop) of them


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def column_parallel_targets(self, ranges: list[RowRange]) -> Targets:
        """Column-parallel (this rank holds some output rows): consecutive row blocks of this weight
        (and bias) come from ``ranges``, each a row range of a checkpoint tensor, in order. A fused
        checkpoint tensor may appear several times (Phi-3's qkv_proj: its q, k and v rows)."""
        in_features = self.weight.shape[1]
        pieces: dict[str, tuple[int, list[tuple[int, int, int]]]] = {}
        offset = 0
        for name, full_rows, start, stop in ranges:
            spans = pieces.setdefault(name, (full_rows, []))[1]
            if spans and spans[-1][0] + spans[-1][2] - spans[-1][1] == offset and spans[-1][2] == start:
                spans[-1] = (spans[-1][0], spans[-1][1], stop)  # contiguous both here and there: one read
            else:
                spans.append((offset, start, stop))
            offset += stop - start
        targets: Targets = {}
        weight = self.weight.detach()
        for name, (full_rows, spans) in pieces.items():
            targets[name + ".weight"] = ShardedTarget(
                (full_rows, in_features), 0, tuple((weight[at : at + stop - start], start, stop) for at, start, stop in spans)
            )
            if self.bias is not None:
                bias = self.bias.detach()
                targets[name + ".bias"] = ShardedTarget(
                    (full_rows,), 0, tuple((bias[at : at + stop - start], start, stop) for at, start, stop in spans)
                )
        return targets


class RowParallelLinear(Linear):
    """This rank's input columns ``[start, stop)`` of ``full_in_features``; the partial products are
    summed over ranks (one all-reduce), then the bias, held whole by every rank, is added once."""

    def __init__(
        self, full_in_features: int, out_features: int, bias: bool, dtype: torch.dtype, tp: TensorParallel
    ) -> None:
        self.tp = tp
        self.full_in_features = full_in_features
        self.in_start, self.in_stop = tp.split(full_in_features)
        super().__init__(self.in_stop - self.in_start, out_features, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias

    def row_parallel_targets(self, name: str) -> Targets:
        weight = self.weight.detach()
        targets: Targets = {
            name + ".weight": ShardedTarget(
                (weight.shape[0], self.full_in_features), 1, ((weight, self.in_start, self.in_stop),)
            )
        }
        if self.bias is not None:
            targets[name + ".bias"] = self.bias.detach()
        return targets


class RMSNorm(nn.Module):
    """``unit_offset`` (Gemma): scale by ``1 + weight`` and cast back only at the end, as Gemma does."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the model dtype, as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig, size: int, dtype: torch.dtype) -> RMSNorm:
    return RMSNorm(size, config.rms_norm_eps, dtype, config.unit_offset_norms)


def rope_inverse_frequencies(rope: RopeConfig, rotary_dim: int, long: bool = False) -> torch.Tensor:
    """Per-pair rotation frequencies (float32, CPU), with linear, llama3 or longrope scaling applied.

    ``long``: longrope's frequencies for sequences past the original context (its short ones otherwise).
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    if rope.type == "longrope":
        factors = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        return 1.0 / (factors * rope.theta**exponents)
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


class RotaryEmbedding(nn.Module):
    """cos/sin of one ``RopeConfig`` for a step's tokens, over the rotated leading ``rotary_dim`` dims."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.rotary_dim = int(head_dim * rope.partial_rotary_factor)
        self.attention_factor = rope.attention_factor
        self.original_max_position_embeddings = rope.original_max_position_embeddings
        self.register_buffer("inv_freq", rope_inverse_frequencies(rope, self.rotary_dim), persistent=False)
        long_inv_freq = None
        if rope.type == "longrope":
            long_inv_freq = rope_inverse_frequencies(rope, self.rotary_dim, long=True)
        self.long_inv_freq: torch.Tensor | None
        self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)

    def forward(
        self, positions: torch.Tensor, context_lens: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, 1, rotary_dim]`` cos and sin (float32, then cast). ``context_lens [T]``: each token's
        sequence length after this step, which picks longrope's factors (unused otherwise)."""
        inv_freq = self.inv_freq[None, :]
        if self.long_inv_freq is not None:
            assert context_lens is not None
            # As transformers' longrope: a forward pass whose sequence reaches past the original
            # context uses the long factors for all its tokens, the short ones otherwise. transformers
            # decides per call; here per sequence, so a batch does not change a sequence's result.
            # NOTE: K/V already cached keep the factors they were computed with. transformers' Phi-3
            # generate() drops the cache once, when a sequence first grows past the original context,
            # and recomputes it with the long factors; pied does not (that needs the scheduler to
            # recompute the sequence), so a sequence that crosses the original context during
            # generation continues from short-factor K/V, as transformers' forward over a cache does.
            use_long = (context_lens > self.original_max_position_embeddings)[:, None]
            inv_freq = torch.where(use_long, self.long_inv_freq[None, :], inv_freq)
        angles = positions[:, None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]`` (half-split layout) by ``cos``/``sin`` ``[T, 1, rotary_dim]``;
    dims past ``rotary_dim`` (partial rotary) pass through."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


Rope = tuple[torch.Tensor, torch.Tensor]  # a step's cos and sin for one RotaryEmbedding


class Attention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        backend: PagedAttention,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.config = config
        # This rank's query heads and KV heads (all of them without tensor parallelism).
        self.head_range = tp.split(config.num_heads)
        self.kv_head_range = tp.kv_heads(config.num_heads, config.num_kv_heads)
        self.num_heads = self.head_range[1] - self.head_range[0]
        self.num_kv_heads = self.kv_head_range[1] - self.kv_head_range[0]
        self.head_dim = config.head_dim
        self.sliding_window = config.layer_sliding_windows[layer]
        self.scale = config.attention_scale
        self.fused_checkpoint = config.fused_checkpoint
        self.backend = backend
        self.sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        self.qkv_proj = Linear(config.hidden_size, sum(self.sizes), config.qkv_bias, dtype)
        self.o_proj = RowParallelLinear(
            config.num_heads * self.head_dim, config.hidden_size, config.o_proj_bias, dtype, tp
        )
        self.q_norm = make_norm(config, self.head_dim, dtype) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim, dtype) if config.qk_norm else None

    def forward(
        self,
        hidden: torch.Tensor,
        rope: Rope | None,
        meta: AttentionMetadata,
        pool: torch.Tensor,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.sizes, dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        stream = meta.stream
        if stream is not None:
            # NOTE: wait for this layer's host blocks to be staged before writing into their pages:
            # the staging copy would otherwise overwrite the new K/V.
            stream.before_attention(self.layer)
        # NOTE: write before attend, so the new tokens see themselves through the pages.
        self.backend.write_kv(pool, k, v, meta.slot_pages(self.layer), meta)
        page_table = meta.page_table(self.layer)
        out = self.backend.attend(q, pool, page_table, meta, self.sliding_window, scale=self.scale)
        if stream is not None:
            # NOTE: the staging area is read (and written) only above: it may now be written back
            # and refilled for a later layer.
            stream.after_attention(self.layer)
        return self.o_proj(out.flatten(1))

    def checkpoint_targets(self, prefix: str) -> Targets:
        head_dim, config = self.head_dim, self.config
        q_rows, kv_rows = config.num_heads * head_dim, config.num_kv_heads * head_dim
        (q_start, q_stop), (kv_start, kv_stop) = self.head_range, self.kv_head_range
        if self.fused_checkpoint:  # one tensor: all q rows, then all k rows, then all v rows
            name, full = prefix + "qkv_proj", q_rows + 2 * kv_rows
            ranges = [
                (name, full, q_start * head_dim, q_stop * head_dim),
                (name, full, q_rows + kv_start * head_dim, q_rows + kv_stop * head_dim),
                (name, full, q_rows + kv_rows + kv_start * head_dim, q_rows + kv_rows + kv_stop * head_dim),
            ]
        else:
            ranges = [(prefix + "q_proj", q_rows, q_start * head_dim, q_stop * head_dim)] + [
                (prefix + name, kv_rows, kv_start * head_dim, kv_stop * head_dim) for name in ("k_proj", "v_proj")
            ]
        targets = self.qkv_proj.column_parallel_targets(ranges) | self.o_proj.row_parallel_targets(
            prefix + "o_proj"
        )
        if self.q_norm is not None and self.k_norm is not None:
            targets[prefix + "q_norm.weight"] = self.q_norm.weight.detach()
            targets[prefix + "k_norm.weight"] = self.k_norm.weight.detach()
        return targets


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.intermediate_range = tp.split(config.intermediate_size)
        local_size = self.intermediate_range[1] - self.intermediate_range[0]
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fused_checkpoint = config.fused_checkpoint
        self.gate_up_proj = Linear(config.hidden_size, 2 * local_size, config.mlp_bias, dtype)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, config.mlp_bias, dtype, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.activation(gate) * up)

    def checkpoint_targets(self, prefix: str) -> Targets:
        size, (start, stop) = self.intermediate_size, self.intermediate_range
        if self.fused_checkpoint:  # one tensor: all gate rows, then all up rows
            name = prefix + "gate_up_proj"
            ranges = [(name, 2 * size, start, stop), (name, 2 * size, size + start, size + stop)]
        else:
            ranges = [(prefix + name, size, start, stop) for name in ("gate_proj", "up_proj")]
        return self.gate_up_proj.column_parallel_targets(ranges) | self.down_proj.row_parallel_targets(
            prefix + "down_proj"
        )


class DecoderLayer(nn.Module):
    """Pre-norm residual blocks; with ``sandwich_norms`` (Gemma) the attention output and the MLP's
    input and output are normed too (``post_attention_layernorm`` then norms the attention output,
    not the MLP input)."""

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        backend: PagedAttention,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config, config.hidden_size, dtype)
        self.self_attn = Attention(config, layer, dtype, backend, tp)
        self.post_attention_layernorm = make_norm(config, config.hidden_size, dtype)
        self.mlp = MLP(config, dtype, tp)
        self.sandwich_norms = config.sandwich_norms
        if self.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(config, config.hidden_size, dtype)
            self.post_feedforward_layernorm = make_norm(config, config.hidden_size, dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: Rope | None,
        meta: AttentionMetadata,
        pool: torch.Tensor,
    ) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(hidden), rope, meta, pool)
        if not self.sandwich_norms:
            hidden = hidden + attended
            return hidden + self.mlp(self.post_attention_layernorm(hidden))
        hidden = hidden + self.post_attention_layernorm(attended)
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))

    def checkpoint_targets(self, prefix: str) -> Targets:
        norms = ["input_layernorm", "post_attention_layernorm"]
        if self.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        return (
            {prefix + name + ".weight": getattr(self, name).weight.detach() for name in norms}
            | self.self_attn.checkpoint_targets(prefix + "self_attn.")
            | self.mlp.checkpoint_targets(prefix + "mlp.")
        )


class CausalLM(nn.Module):
    """Token ids of one step in, logits of the rows that are sampled out."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        backend: PagedAttention | None = None,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        backend = backend or TorchPagedAttention()
        self.config = config
        self.tp = tp
        # Vocabulary-parallel: this rank's rows of the embedding (and of the LM head).
        self.vocab_start, self.vocab_stop = tp.split(config.vocab_size)
        embedding = torch.empty(self.vocab_stop - self.vocab_start, config.hidden_size, dtype=dtype)
        self.embed_tokens = nn.Parameter(embedding, requires_grad=False)
        # Gemma scales embeddings by sqrt(hidden) rounded to the model dtype, as transformers does.
        self.embedding_multiplier = (
            None
            if config.embedding_multiplier is None
            else torch.tensor(config.embedding_multiplier, device="cpu").to(dtype).item()  # (a number, on any device)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, backend, tp) for i in range(config.num_layers)
        )
        self.norm = make_norm(config, config.hidden_size, dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, self.vocab_stop - self.vocab_start, False, dtype)
        )
        # One rotary embedding per distinct rope (Gemma's local and global layers differ); a layer
        # without rope (SmolLM3) has none.
        distinct = list(dict.fromkeys(rope for rope in config.layer_ropes if rope is not None))
        self.rotary = nn.ModuleList(RotaryEmbedding(rope, config.head_dim) for rope in distinct)
        self.layer_rotary = [None if rope is None else distinct.index(rope) for rope in config.layer_ropes]
        self.needs_context_lens = any(rotary.long_inv_freq is not None for rotary in self.rotary)

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
        the final norm and lm_head (the other rows' logits would be thrown away). With tensor
        parallelism only rank 0 gets the whole vocabulary's logits; another rank gets its own columns.
        """
        ropes = self.rope_cos_sin(positions, meta, self.embed_tokens.dtype)
        hidden = self.embed(input_ids)
        if self.embedding_multiplier is not None:
            hidden = hidden * self.embedding_multiplier
        for layer, rotary in zip(self.layers, self.layer_rotary):
            hidden = layer(hidden, None if rotary is None else ropes[rotary], meta, pool)
        hidden = self.norm(hidden[logits_indices])
        head = self.embed_tokens if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, head).float()
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return self.tp.gather_columns(logits)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.embed_tokens)
        # Each rank looks up the ids in its vocabulary rows, zeros for the others; the sum over
        # ranks is the embedding (exactly: one rank contributes each row).
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.embed_tokens.shape[0])
        hidden = F.embedding(local_ids.masked_fill(outside, 0), self.embed_tokens)
        return self.tp.all_reduce(hidden.masked_fill(outside[:, None], 0))

    def rope_cos_sin(
        self, positions: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype
    ) -> list[Rope]:
        """Each rotary embedding's ``[T, 1, rotary_dim]`` cos and sin, once per step for all layers."""
        context_lens = None
        if self.needs_context_lens:
            query_lens = meta.query_start_loc.diff()
            context_lens = torch.repeat_interleave(meta.context_lens, query_lens, output_size=meta.num_tokens)
        return [rotary(positions, context_lens, dtype) for rotary in self.rotary]

    def checkpoint_targets(self) -> Targets:
        """Checkpoint tensor name -> the (view of the) parameter it is loaded into."""
        prefix = self.config.checkpoint_prefix
        vocab = (self.config.vocab_size, self.config.hidden_size)

        def vocab_rows(parameter: torch.Tensor) -> ShardedTarget:
            return ShardedTarget(vocab, 0, ((parameter.detach(), self.vocab_start, self.vocab_stop),))

        targets: Targets = {
            prefix + "embed_tokens.weight": vocab_rows(self.embed_tokens),
            prefix + "norm.weight": self.norm.weight.detach(),
        }
        if self.lm_head is not None:
            targets[self.config.lm_head_name] = vocab_rows(self.lm_head.weight)
        for i, layer in enumerate(self.layers):
            targets |= layer.checkpoint_targets(f"{prefix}layers.{i}.")
        return targets
