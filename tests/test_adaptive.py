"""Adaptive expansion end to end on the CPU: the controller sizes the host lease from the stalls
the executor really measures. A throttled copy engine (a slower "link") must settle on a smaller
lease than an unthrottled one, with the stall fraction held near the target in both."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import build_model_dir

import proto
from pied.config import EngineConfig
from pied.inproc import EngineCore


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Deeper and wider than the other tiny models, so a step computes long enough to hide copies.
    return build_model_dir(
        tmp_path_factory.mktemp("adaptive"), "llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4
    )


def run(model_dir, throttle: float | None) -> dict:
    extra = {"copy_throttle_bytes_per_s": throttle} if throttle else {}
    config = EngineConfig(
        model=str(model_dir),
        dtype="float32",
        block_size=4,
        device_kv_blocks=24,
        kv_policy="pie",
        expansion="adaptive",
        host_kv_gib=0.002,  # ~260 host blocks at most
        extra=extra,
    )
    engine = EngineCore(config)
    rng = np.random.default_rng(0)
    params = proto.SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    for i in range(24):
        prompt = [1] + rng.integers(5, 500, size=40).tolist()
        engine.add_request(proto.AddRequest(f"r{i}", proto.pack_i32(prompt), params))
    leases, stalls, steps = [], [], []
    while engine.has_unfinished():
        before = engine.totals.stall_time, engine.totals.step_time
        engine.step()
        leases.append(engine.scheduler.host_lease)
        stalls.append(engine.totals.stall_time - before[0])
        steps.append(engine.totals.step_time - before[1])
    half = len(leases) // 2
    settled = float(np.mean(leases[half:]))
    stall_fraction = sum(stalls[half:]) / max(sum(steps[half:]), 1e-9)
    engine.close()
    return dict(settled_lease=settled, max_lease=max(leases), stall_fraction=stall_fraction, steps=len(leases))


def test_lease_settles_lower_on_a_slower_link(model_dir):
    fast = run(model_dir, None)
    slow = run(model_dir, 4e6)  # 4 MB/s: a few dozen 8 KiB host blocks per step at most
    # Under demand the lease grows from zero; on the fast link it reaches far more blocks.
    assert fast["max_lease"] > 0
    assert slow["settled_lease"] < 0.7 * fast["settled_lease"], (fast, slow)
    # Stalls are steered toward the 2% target (CPU timing is noisy: allow a generous band).
    assert fast["stall_fraction"] < 0.10, fast
    assert slow["stall_fraction"] < 0.15, slow
