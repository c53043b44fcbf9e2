"""perf/gpu_check.sh, without a GPU: the script parses, its steps fit the device budget, and its
decode roofline benchmark runs end to end in its tiny CPU mode and reports every field."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "perf" / "gpu_check.sh"


def test_script_parses_and_fits_the_budget():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    timeouts = [int(seconds) for seconds in re.findall(r"^timeout (\d+) ", text, flags=re.MULTILINE)]
    assert len(timeouts) == 6 and sum(timeouts) <= 530, timeouts  # a device check must end in < 540 s
    assert "perf/decode_roofline.py" in text


def test_decode_roofline_tiny_mode():
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    completed = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "decode_roofline.py"), "--tiny", "--repeats", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "decode_roofline" and result["attention_backend"] == "torch"
    assert not result["cuda_graphs"]  # CPU: the graphs' padded path, not captured
    assert [(row["batch"], row["context"]) for row in result["decode"]] == [
        (1, 32),
        (4, 32),
        (1, 128),
        (4, 128),
    ]
    for row in result["decode"]:
        assert row["tokens_per_s"] > 0 and row["roofline_ms"] > 0 and row["step_over_roofline"] > 0
        assert row["host_ms"] >= 0 and not row["kv_shared"]
    assert result["weight_gib"] >= 0 and result["memory_bandwidth_gb_per_s"] > 0
