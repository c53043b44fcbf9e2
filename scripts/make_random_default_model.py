"""Write the placeholder bundled model (random weights, a real BPE tokenizer and chat template) to
pied/models/default. Needs the test extra (transformers). Deterministic: seed 0.

    python scripts/make_random_default_model.py
"""

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import build_model_dir  # noqa: E402

target = ROOT / "pied" / "models" / "default"
shutil.rmtree(target, ignore_errors=True)
build_model_dir(
    target,
    "llama",
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=0.05,
)
print(f"wrote {target}")
