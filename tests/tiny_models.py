"""Tiny Hugging Face model folders built on the spot (nothing is downloaded).

``build_model_dir(path, arch)`` writes config.json, safetensors weights (optionally sharded),
generation_config.json, tokenizer.json (a byte-level BPE trained on Python's bundled docs) and
tokenizer_config.json with a chat template, using transformers itself so the folders look exactly
like the ones users download.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BOS, EOS, IM_END = 1, 2, 4

# Phi-3 / Phi-4-mini longrope scaling at tiny sizes (short and long factors per rotary pair).
PHI3_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "short_factor": [1.0, 1.3, 2.1, 3.7],
    "long_factor": [1.5, 4.0, 9.0, 20.0],
}

ARCHES = ("llama", "qwen2", "mistral", "qwen3", "gemma3", "phi3", "smollm3")
CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "mistral": "MistralConfig",
    "qwen3": "Qwen3Config",
    "gemma3": "Gemma3TextConfig",
    "phi3": "Phi3Config",
    "smollm3": "SmolLM3Config",
    "gemma3-multimodal": "Gemma3TextConfig",  # the text config, nested in a Gemma3Config
}
MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "gemma3-multimodal": "Gemma3ForConditionalGeneration",
}
# What makes each newer architecture differ from Llama, at tiny sizes (overridable per call).
ARCH_DEFAULTS: dict[str, dict] = {
    "mistral": dict(sliding_window=4096),
    "qwen3": dict(head_dim=24),  # not hidden / heads (16)
    "gemma3": dict(
        head_dim=24,
        query_pre_attn_scalar=20,  # the attention scale is its own, not head_dim's
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        },
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    ),
    "phi3": dict(partial_rotary_factor=0.5, pad_token_id=None),
    # a vision tower and projector beside the text model, which is all pied loads
    "gemma3-multimodal": dict(
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        boi_token_index=BOS,  # image token ids inside the tiny vocabulary
        eoi_token_index=EOS,
        image_token_index=IM_END,
    ),
    "smollm3": dict(no_rope_layers=[1, 0], pad_token_id=None, tie_word_embeddings=True),
}
# Norm weights are randomised for these (transformers initialises them to 1, or 0 for Gemma's 1 + w),
# so a norm applied wrongly or not at all shows in the logits.
RANDOM_NORM_ARCHES = ("qwen3", "gemma3", "phi3", "smollm3", "gemma3-multimodal")


def corpus_lines() -> list[str]:
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics.values())
    return [line for line in text.splitlines() if line.strip()]


@functools.lru_cache(maxsize=4)
def tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE tokenizer (lossless for any UTF-8) as a tokenizer.json string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok.to_str()


def model_config(arch: str, vocab_size: int = 512, **overrides):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        initializer_range=0.2,  # peaked logits, so greedy comparisons rarely meet near-ties
    )
    if arch == "gemma3-multimodal":
        multimodal = dict(ARCH_DEFAULTS[arch])
        multimodal.update({key: overrides.pop(key) for key in list(overrides) if key in multimodal})
        text_config = model_config("gemma3", vocab_size, **overrides)
        vision_config = transformers.SiglipVisionConfig(**multimodal.pop("vision_config"))
        return transformers.Gemma3Config(
            text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **multimodal
        )
    common.update(ARCH_DEFAULTS.get(arch, {}))
    common.update(overrides)
    return getattr(transformers, CONFIG_CLASSES[arch])(**common)


def build_model_dir(
    path: str | Path,
    arch: str = "llama",
    *,
    vocab_size: int = 512,
    sharded: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    extra_eos: list[int] | None = None,
    **config_overrides,
) -> Path:
    """Write a random tiny model folder of ``arch`` to ``path`` and return the path."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model_config(arch, vocab_size=vocab_size, **config_overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[arch])(config)
    if arch in RANDOM_NORM_ARCHES:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.3)
    model = model.to(getattr(torch, dtype))
    model.eval()
    save_kwargs = {"max_shard_size": "60KB"} if sharded else {}
    model.save_pretrained(path, **save_kwargs)

    generation = {"bos_token_id": BOS, "eos_token_id": [EOS] + list(extra_eos or [])}
    (path / "generation_config.json").write_text(json.dumps(generation))
    (path / "tokenizer.json").write_text(tokenizer_json(vocab_size))
    tokenizer_config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": config.get_text_config().max_position_embeddings,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def load_hf_model(path: str | Path):
    """The transformers reference model for a folder (fp32, eval mode)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model
