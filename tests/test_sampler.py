"""The sampler against hand-computed references and sampling statistics (fixed seeds, not flaky)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import proto
from workers.executor.sampler import Sampler, SamplingState

VOCAB = 32
EOS = 2
DEVICE = torch.device("cpu")


def make_state(prompt: list[int] | None = None, vocab: int = VOCAB, eos: set[int] | None = None, **params):
    return SamplingState(
        proto.SamplingParams(**params),
        np.array(prompt or [5, 6, 7], dtype=np.int32),
        vocab,
        {EOS} if eos is None else eos,
        DEVICE,
    )


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * scale


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability zero"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# Chi-square critical values at p = 0.001 (the draws are seeded, so this is a fixed check, not a
# flaky one; the loose level just keeps it robust to changes in torch's RNG).
CHI2_CRITICAL_0001 = {3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32, 9: 27.88}


def sample_counts(sampler: Sampler, logits_row: torch.Tensor, num: int, **params) -> np.ndarray:
    torch.manual_seed(1234)
    states = [make_state(**params) for _ in range(num)]
    ids, _ = sampler.sample(logits_row.expand(num, -1).contiguous(), states)
    return np.bincount(ids, minlength=logits_row.shape[-1])


# ---------------------------------------------------------------- greedy and its equivalents


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    sampler = Sampler(VOCAB, DEVICE)
    logits = random_logits(16).to(dtype)
    ids, logprobs = sampler.sample(logits, [make_state(temperature=0.0) for _ in range(16)])
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, logits.float().argmax(dim=-1).numpy())
    assert logprobs == [None] * 16


def test_greedy_ties_pick_the_lowest_id():
    sampler = Sampler(VOCAB, DEVICE)
    logits = torch.zeros(2, VOCAB)
    logits[0, [7, 3, 20]] = 5.0
    logits[1, [30, 31]] = 1.0
    ids, _ = sampler.sample(logits, [make_state(temperature=0.0), make_state(temperature=0.0)])
    assert ids.tolist() == [3, 30]


def test_sample_leaves_the_logits_untouched():
    sampler = Sampler(VOCAB, DEVICE)
    logits = random_logits(3)
    before = logits.clone()
    states = [
        make_state(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3) for _ in range(3)
    ]
    sampler.sample(logits, states)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0])
def test_top_k_one_is_greedy_at_any_temperature(temperature):
    sampler = Sampler(VOCAB, DEVICE)
    logits = random_logits(64, seed=1)
    torch.manual_seed(0)
    ids, _ = sampler.sample(logits, [make_state(temperature=temperature, top_k=1) for _ in range(64)])
    np.testing.assert_array_equal(ids, logits.argmax(dim=-1).numpy())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_tiny_top_p_is_greedy(temperature):
    sampler = Sampler(VOCAB, DEVICE)
    logits = random_logits(64, seed=2)
    torch.manual_seed(0)
    ids, _ = sampler.sample(logits, [make_state(temperature=temperature, top_p=1e-6) for _ in range(64)])
    np.testing.assert_array_equal(ids, logits.argmax(dim=-1).numpy())


def test_tiny_temperature_counts_as_greedy():
    sampler = Sampler(VOCAB, DEVICE)
    logits = random_logits(8, seed=3)
    ids, _ = sampler.sample(logits, [make_state(temperature=1e-7) for _ in range(8)])
    np.testing.assert_array_equal(ids, logits.argmax(dim=-1).numpy())


def test_mixed_batch_keeps_greedy_rows_greedy():
    sampler = Sampler(VOCAB, DEVICE)
    logits = random_logits(10, seed=4, scale=0.5)  # flat, so random rows rarely hit the argmax
    states = [make_state(temperature=0.0 if i % 2 else 1.5) for i in range(10)]
    torch.manual_seed(0)
    ids, _ = sampler.sample(logits, states)
    greedy_rows = [i for i in range(10) if i % 2]
    np.testing.assert_array_equal(ids[greedy_rows], logits[greedy_rows].argmax(dim=-1).numpy())


# ---------------------------------------------------------------- filtering and statistics


def test_temperature_sampling_matches_softmax():
    sampler = Sampler(8, DEVICE)
    logits = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0, 1.2, 0.8])
    for temperature in (0.7, 1.0, 1.8):
        counts = sample_counts(sampler, logits, 20000, temperature=temperature)
        probs = torch.softmax(logits / temperature, dim=-1).numpy()
        assert chi_square(counts, probs) < CHI2_CRITICAL_0001[7], temperature


def test_top_k_renormalises_over_the_k_best():
    sampler = Sampler(8, DEVICE)
    logits = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0, 1.2, 0.8])
    counts = sample_counts(sampler, logits, 20000, temperature=1.0, top_k=4)
    kept = torch.full_like(logits, float("-inf"))
    best = logits.topk(4).indices
    kept[best] = logits[best]
    assert chi_square(counts, torch.softmax(kept, dim=-1).numpy()) < CHI2_CRITICAL_0001[3]


def test_top_p_keeps_the_smallest_set_reaching_p():
    sampler = Sampler(6, DEVICE)
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = probs.log()
    # Cumulative 0.4, 0.65, 0.8, ...: top_p = 0.7 keeps the three best (vLLM drops a token only
    # when the tokens below it sum to at most 1 - p).
    counts = sample_counts(sampler, logits, 20000, top_p=0.7)
    assert counts[3:].sum() == 0
    expected = np.array([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8
    assert chi_square(counts, expected) < 13.82  # 2 degrees of freedom


def test_top_k_and_top_p_together():
    sampler = Sampler(6, DEVICE)
    logits = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]).log()
    counts = sample_counts(sampler, logits, 5000, top_k=2, top_p=0.95)
    assert counts[2:].sum() == 0 and counts[0] > counts[1] > 0


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    sampler = Sampler(6, DEVICE)
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    counts = sample_counts(sampler, probs.log(), 20000, min_p=0.3)  # threshold 0.12
    assert counts[3:].sum() == 0
    expected = np.array([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8
    assert chi_square(counts, expected) < 13.82


def test_min_p_applies_after_temperature():
    sampler = Sampler(3, DEVICE)
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    # At temperature 0.25 the probabilities are ~[0.98, 0.018, 0.0003]: min_p 0.05 keeps only the best.
    for seed in range(20):
        torch.manual_seed(seed)
        ids, _ = sampler.sample(logits, [make_state(vocab=3, temperature=0.25, min_p=0.05)])
        assert ids.tolist() == [0]


def test_batched_rows_with_different_parameters():
    sampler = Sampler(8, DEVICE)
    logits = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0, 1.2, 0.8])
    num = 4000
    params = [dict(temperature=0.5), dict(top_k=2), dict(top_p=0.5), dict(min_p=0.6), dict(temperature=0.0)]
    states = [make_state(**params[i % len(params)]) for i in range(num * len(params))]
    torch.manual_seed(7)
    ids, _ = sampler.sample(logits.expand(len(states), -1).contiguous(), states)
    per_kind = [np.bincount(ids[i :: len(params)], minlength=8) for i in range(len(params))]
    probs = torch.softmax(logits / 0.5, dim=-1).numpy()
    assert chi_square(per_kind[0], probs) < CHI2_CRITICAL_0001[7]
    assert set(np.nonzero(per_kind[1])[0]) == {3, 6}
    assert set(np.nonzero(per_kind[2])[0]) <= {3, 6, 0}
    assert set(np.nonzero(per_kind[3])[0]) <= {3, 6, 0}  # p >= 0.6 * p(3)
    assert set(np.nonzero(per_kind[4])[0]) == {3}


# ---------------------------------------------------------------- penalties and min_tokens


def reference_penalties(logits, prompt, outputs, repetition, frequency, presence):
    """The formulas, one logit at a time."""
    result = logits.clone()
    for token in range(logits.shape[-1]):
        value = float(result[token])
        if token in prompt or token in outputs:
            value = value / repetition if value > 0 else value * repetition
        count = outputs.count(token)
        value -= frequency * count
        value -= presence * (1.0 if count else 0.0)
        result[token] = value
    return result


@pytest.mark.parametrize(
    "repetition, frequency, presence",
    [(1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, -0.8), (1.5, 0.4, 0.9), (1.0, -1.2, 1.1)],
)
def test_penalties_match_the_formulas(repetition, frequency, presence):
    sampler = Sampler(VOCAB, DEVICE)
    prompt = [3, 4, 4, 9, 30]
    outputs = [9, 11, 11, 11, 12, 3]
    state = make_state(
        prompt=prompt, repetition_penalty=repetition, frequency_penalty=frequency, presence_penalty=presence
    )
    for token in outputs:
        state.append(token)
    plain = make_state(prompt=prompt)
    logits = random_logits(2, seed=5)
    processed = sampler.process_logits(logits, [plain, state])
    torch.testing.assert_close(processed[0], logits[0])
    expected = reference_penalties(logits[1], prompt, outputs, repetition, frequency, presence)
    torch.testing.assert_close(processed[1], expected, rtol=1e-6, atol=1e-6)


def test_penalised_rows_in_any_position_of_the_batch():
    sampler = Sampler(VOCAB, DEVICE)
    logits = random_logits(4, seed=6)
    states = [
        make_state(),
        make_state(prompt=[1, 2], repetition_penalty=1.8),
        make_state(),
        make_state(prompt=[8], frequency_penalty=1.0),
    ]
    states[1].append(17)
    states[3].append(8)
    states[3].append(8)
    processed = sampler.process_logits(logits, states)
    torch.testing.assert_close(processed[0], logits[0])
    torch.testing.assert_close(processed[2], logits[2])
    torch.testing.assert_close(processed[1], reference_penalties(logits[1], [1, 2], [17], 1.8, 0.0, 0.0))
    torch.testing.assert_close(processed[3], reference_penalties(logits[3], [8], [8, 8], 1.0, 1.0, 0.0))


def test_penalty_state_is_allocated_only_when_used():
    assert make_state().output_counts is None and make_state().prompt_mask is None
    only_frequency = make_state(frequency_penalty=0.5)
    assert only_frequency.output_counts is not None and only_frequency.prompt_mask is None
    with_repetition = make_state(prompt=[1, 4], repetition_penalty=1.2)
    assert with_repetition.prompt_mask is not None
    assert with_repetition.prompt_mask.nonzero().flatten().tolist() == [1, 4]


def test_greedy_with_repetition_penalty_avoids_the_repeated_token():
    sampler = Sampler(4, DEVICE)
    logits = torch.tensor([[0.0, 2.0, 1.9, 0.0]])
    state = make_state(prompt=[0], vocab=4, temperature=0.0, repetition_penalty=2.0)
    assert sampler.sample(logits, [state])[0].tolist() == [1]
    state.append(1)
    assert sampler.sample(logits, [state])[0].tolist() == [2]  # 2.0 / 2 < 1.9


def test_min_tokens_blocks_eos_and_stop_tokens():
    sampler = Sampler(VOCAB, DEVICE)
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 9] = 9.0  # a stop token id
    logits[0, 15] = 8.0
    state = make_state(temperature=0.0, min_tokens=2, stop_token_ids=[9])
    for _ in range(2):
        token = int(sampler.sample(logits, [state])[0][0])
        assert token == 15
        state.append(token)
    assert int(sampler.sample(logits, [state])[0][0]) == EOS


def test_min_tokens_with_ignore_eos_leaves_eos_alone():
    sampler = Sampler(VOCAB, DEVICE)
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 9] = 9.0
    state = make_state(temperature=0.0, min_tokens=3, stop_token_ids=[9], ignore_eos=True)
    assert int(sampler.sample(logits, [state])[0][0]) == EOS


def test_min_tokens_blocks_every_eos_id_when_sampling():
    sampler = Sampler(VOCAB, DEVICE)
    logits = torch.zeros(256, VOCAB)
    logits[:, [EOS, 20]] = 6.0
    states = [make_state(eos={EOS, 20}, min_tokens=1) for _ in range(256)]
    torch.manual_seed(0)
    ids, _ = sampler.sample(logits, states)
    assert not set(ids.tolist()) & {EOS, 20}


# ---------------------------------------------------------------- seeds


def run_steps(
    sampler: Sampler, batches: list[tuple[list[SamplingState], int]], logits_seed: int
) -> list[int]:
    """Sample ``len(batches)`` steps; each batch lists its states and the row of the tracked one.
    Every step's logits depend only on the step number, so rows see the same distribution."""
    tracked = []
    for step, (states, row) in enumerate(batches):
        logits = random_logits(len(states), seed=logits_seed + step, scale=1.0)
        logits[row] = random_logits(1, seed=10_000 + step, scale=1.0)[0]
        ids, _ = sampler.sample(logits, states)
        for state, token in zip(states, ids.tolist()):
            state.append(token)
        tracked.append(int(ids[row]))
    return tracked


def test_same_seed_same_tokens_whatever_the_batch():
    sampler = Sampler(VOCAB, DEVICE)
    params = dict(seed=42, temperature=1.0, top_p=0.9, top_k=20)
    steps = 12

    alone = make_state(**params)
    reference = run_steps(sampler, [([alone], 0)] * steps, logits_seed=0)

    torch.manual_seed(99)
    crowded = make_state(**params)
    others = [
        make_state(temperature=0.8),
        make_state(seed=7, temperature=1.3),
        make_state(temperature=0.0),
        make_state(top_p=0.5, min_p=0.1, repetition_penalty=1.2),
    ]
    batches = []
    for step in range(steps):
        row = step % (len(others) + 1)
        states = others[:row] + [crowded] + others[row:]
        batches.append((states[: 2 + step % 4] if row < 2 + step % 4 else states, row))
    assert run_steps(sampler, batches, logits_seed=500) == reference

    torch.manual_seed(12345)  # the default generator's state does not matter either
    again = make_state(**params)
    assert run_steps(sampler, [([make_state(), again], 1)] * steps, logits_seed=900) == reference


def test_different_seeds_differ_and_unseeded_rows_vary():
    sampler = Sampler(VOCAB, DEVICE)
    flat = torch.zeros(1, VOCAB)
    first = [make_state(seed=1) for _ in range(1)]
    second = [make_state(seed=2) for _ in range(1)]
    a = [int(sampler.sample(flat, first)[0][0]) for _ in range(20)]
    b = [int(sampler.sample(flat, second)[0][0]) for _ in range(20)]
    assert a != b
    torch.manual_seed(0)
    ids, _ = sampler.sample(torch.zeros(64, VOCAB), [make_state() for _ in range(64)])
    assert len(set(ids.tolist())) > 20


def test_seeded_sampling_follows_the_distribution():
    sampler = Sampler(4, DEVICE)
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    counts = np.zeros(4, dtype=np.int64)
    for seed in range(3000):
        counts[int(sampler.sample(logits, [make_state(vocab=4, seed=seed)])[0][0])] += 1
    assert chi_square(counts, torch.softmax(logits[0], dim=-1).numpy()) < CHI2_CRITICAL_0001[3]


def test_huge_and_negative_seeds_are_accepted():
    sampler = Sampler(VOCAB, DEVICE)
    for seed in (-1, 2**70, 0):
        sampler.sample(torch.zeros(1, VOCAB), [make_state(seed=seed)])


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_best_first():
    sampler = Sampler(VOCAB, DEVICE)
    logits = random_logits(4, seed=8)
    states = [
        make_state(logprobs=5, temperature=0.5, repetition_penalty=1.5, presence_penalty=1.0),
        make_state(),
        make_state(logprobs=0, temperature=0.0),
        make_state(logprobs=20, top_k=3),
    ]
    states[0].append(int(logits[0].argmax()))
    torch.manual_seed(0)
    ids, logprobs = sampler.sample(logits, states)
    reference = torch.log_softmax(logits, dim=-1)
    assert logprobs[1] is None
    for row, k in ((0, 5), (2, 0), (3, 20)):
        entry = logprobs[row]
        assert isinstance(entry, proto.TokenLogprobs)
        assert entry.logprob == pytest.approx(float(reference[row, ids[row]]), abs=1e-5)
        top_ids = proto.unpack_i32(entry.top_ids)
        top_values = proto.unpack_f32(entry.top_logprobs)
        assert len(top_ids) == len(top_values) == k
        if k:
            np.testing.assert_array_equal(top_ids, reference[row].argsort(descending=True)[:k].numpy())
            np.testing.assert_allclose(top_values, reference[row, top_ids.tolist()].numpy(), atol=1e-5)
            assert np.all(np.diff(top_values) <= 0)


def test_logprobs_of_bfloat16_logits_are_computed_in_float32():
    sampler = Sampler(VOCAB, DEVICE)
    logits = random_logits(2, seed=9).to(torch.bfloat16)
    ids, logprobs = sampler.sample(logits, [make_state(temperature=0.0, logprobs=3)] * 2)
    reference = torch.log_softmax(logits.float(), dim=-1)
    for row in range(2):
        assert logprobs[row].logprob == pytest.approx(float(reference[row, ids[row]]), abs=1e-6)
        assert proto.unpack_i32(logprobs[row].top_ids)[0] == ids[row]


def test_logprobs_capped_by_max_logprobs():
    sampler = Sampler(VOCAB, DEVICE, max_logprobs=4)
    _, logprobs = sampler.sample(random_logits(1), [make_state(logprobs=10)])
    assert len(proto.unpack_i32(logprobs[0].top_ids)) == 4


# ---------------------------------------------------------------- edges


def test_empty_batch_and_shape_checks():
    sampler = Sampler(VOCAB, DEVICE)
    ids, logprobs = sampler.sample(torch.zeros(0, VOCAB), [])
    assert ids.shape == (0,) and ids.dtype == np.int32 and logprobs == []
    with pytest.raises(ValueError, match="do not match"):
        sampler.sample(torch.zeros(2, VOCAB), [make_state()])
    with pytest.raises(ValueError, match="do not match"):
        sampler.sample(torch.zeros(1, VOCAB + 1), [make_state()])


def test_masked_tokens_are_never_sampled():
    sampler = Sampler(VOCAB, DEVICE)
    logits = torch.full((512, VOCAB), float("-inf"))
    logits[:, 13] = 0.0
    logits[:, 14] = -1.0
    torch.manual_seed(0)
    ids, _ = sampler.sample(logits, [make_state(temperature=2.0) for _ in range(512)])
    assert set(ids.tolist()) <= {13, 14}


def test_sampled_ids_are_in_range_for_a_large_vocabulary():
    vocab = 50_000
    sampler = Sampler(vocab, DEVICE)
    logits = random_logits(8, vocab=vocab, seed=10)
    torch.manual_seed(0)
    ids, _ = sampler.sample(logits, [make_state(vocab=vocab, top_p=0.95, top_k=50) for _ in range(8)])
    assert ((ids >= 0) & (ids < vocab)).all()
    top50 = logits.topk(50, dim=-1).indices
    assert all(int(ids[i]) in top50[i].tolist() for i in range(8))
    assert math.isfinite(float(logits[0, ids[0]]))


def test_logit_bias_is_added_before_sampling_and_penalties():
    vocab = 50
    sampler = Sampler(vocab, "cpu")
    logits = torch.zeros(3, vocab)
    logits[:, 3] = 5.0  # the favourite
    logits[:, 9] = 4.0

    def make(**params):
        return SamplingState(proto.SamplingParams(**params), np.array([1, 2], dtype=np.int32), vocab, {0}, torch.device("cpu"))

    plain, banned = make(temperature=0), make(temperature=0, logit_bias={3: -100.0})
    pushed = make(temperature=0, logit_bias={20: 10.0, 3: -1.0})
    ids, _ = sampler.sample(logits, [plain, banned, pushed])
    # -100 takes the favourite out, +10 makes another the pick (both rows biased in one batch);
    # the unbiased row beside them is as it was.
    assert ids.tolist() == [3, 9, 20]
    # +10 on a token far behind makes it the pick, sampled or greedy; ids past the vocabulary are dropped.
    for temperature in (0.0, 1.0):
        boosted = make(temperature=temperature, seed=3, logit_bias={20: 10.0, vocab + 5: 50.0})
        assert int(sampler.sample(logits[:1], [boosted])[0][0]) == 20
    # Logprobs stay those of the raw logits (vLLM's default), not of the biased ones.
    scored = make(temperature=0, logit_bias={20: 10.0}, logprobs=0)
    _, [entry] = sampler.sample(logits[:1], [scored])
    assert entry is not None
    raw = torch.log_softmax(logits[0], dim=-1)[20].item()
    assert abs(entry.logprob - raw) < 1e-5
