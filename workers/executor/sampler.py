"""Turns one step's logits into one token per request, the way vLLM v1's sampler does.

Order of operations (vLLM's): raw logprobs come from the logits as the model produced them; then
min_tokens masking and logit_bias, then penalties (repetition over prompt + output, frequency and presence over
output); greedy rows take the argmax of that; the others are divided by their temperature, filtered
by min_p, top_k and top_p, and sampled with the exponential race ``argmax(probs / Exponential(1))``,
which draws from a request's own ``torch.Generator`` when it has a seed, so a seeded request gives
the same tokens whatever else is in the batch.

Then the masks that constrain the output (vLLM's ``allowed_token_ids``, ``bad_words`` and structured
output): masked tokens get ``-inf`` in the logits every later stage reads, so greedy, top-k/p and the
race all pick only allowed tokens, and batching is unchanged (one mask row per constrained request).
Logprobs stay those of the raw logits, as vLLM returns by default.

Everything is batched: an all-greedy batch without penalties is one argmax; the only per-row loop
that launches kernels draws the noise of seeded rows.

Prompt logprobs (vLLM's ``prompt_logprobs``) come from extra logits rows the runner asks the model
for during prefill, one per prompt position whose next prompt token's logprob is still owed
(:class:`PromptLogprobRun`); they are of the raw logits too, with each prompt token's rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import proto
from workers.grammar import GrammarCompiler, allocate_bitmask, apply_bitmask

# vLLM treats temperatures below this as greedy (dividing by them would overflow float32).
SAMPLING_EPS = 1e-5

# What the exponential noise is clamped to: exponential_() may return exactly 0, and 0/0 for a
# masked token would be NaN, which argmax picks.
_TINY = torch.finfo(torch.float32).tiny


class SamplingState:
    """One request's sampling state, alive in the executor from its first step until it finishes.

    It holds the request's generator (seeded requests only), its penalty counts (requests that use
    penalties only, so a plain request costs no device memory) and its output tokens.
    """

    def __init__(
        self,
        params: proto.SamplingParams,
        prompt_token_ids: np.ndarray,
        vocab_size: int,
        eos_token_ids: set[int],
        device: torch.device | str,
        grammar_compiler: GrammarCompiler | None = None,
    ) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.output_token_ids: list[int] = []
        self.greedy = params.temperature < SAMPLING_EPS

        # A greedy request never draws noise, so it needs no generator even with a seed.
        self.generator: torch.Generator | None = None
        if params.seed is not None and not self.greedy:
            self.generator = torch.Generator(device=self.device)
            # manual_seed takes uint64; wrap Python ints of any size (and negatives) into it.
            self.generator.manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)

        # Below min_tokens, the tokens that would stop the request are masked (vLLM masks
        # all_stop_token_ids: stop_token_ids plus the eos ids unless ignore_eos).
        blocked = set(params.stop_token_ids)
        if not params.ignore_eos:
            blocked |= set(eos_token_ids)
        self.min_tokens_blocked_ids = (
            sorted(t for t in blocked if 0 <= t < vocab_size) if params.min_tokens else []
        )

        self.uses_penalties = (
            params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
            or params.repetition_penalty != 1.0
        )
        # float32 so the frequency penalty is one multiply; counted on device as tokens are appended.
        self.output_counts: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None
        if self.uses_penalties:
            self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)
        if params.repetition_penalty != 1.0:
            ids = np.asarray(prompt_token_ids, dtype=np.int64)
            ids = ids[(ids >= 0) & (ids < vocab_size)]
            self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            self.prompt_mask[torch.from_numpy(ids).to(self.device)] = True

        # Tokens outside allowed_token_ids get -inf: one boolean row, built once.
        self.disallowed: torch.Tensor | None = None
        if params.allowed_token_ids:
            allowed = [t for t in params.allowed_token_ids if 0 <= t < vocab_size]
            self.disallowed = torch.ones(vocab_size, dtype=torch.bool, device=self.device)
            self.disallowed[torch.tensor(allowed, dtype=torch.long, device=self.device)] = False
        self.bad_words = [list(word) for word in params.bad_words_token_ids if word]
        # logit_bias as (ids, values) on the device, built once (ids past the vocabulary dropped).
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        biased = {t: b for t, b in params.logit_bias.items() if 0 <= t < vocab_size}
        if biased:
            self.bias = (
                torch.tensor(list(biased), dtype=torch.long, device=self.device),
                torch.tensor(list(biased.values()), dtype=torch.float32, device=self.device),
            )
        self.eos_ids = sorted(t for t in eos_token_ids if 0 <= t < vocab_size)
        # prompt_logprobs: the prompt (the targets of its logits rows) and the first position whose
        # logits row is still owed. Kept across preemption, so a recomputed prompt is not sent twice.
        self.num_prompt_tokens = len(prompt_token_ids)
        self.prompt_logprob_targets: np.ndarray | None = None
        self.next_prompt_logprob_row = 0
        if params.prompt_logprobs is not None:
            self.prompt_logprob_targets = np.asarray(prompt_token_ids, dtype=np.int64)
        self.matcher = None
        if params.grammar is not None:
            if grammar_compiler is None:
                raise ValueError("a request has a grammar but the executor has no grammar compiler.")
            self.matcher = grammar_compiler.matcher(params.grammar)

    @property
    def constrained(self) -> bool:
        """True when a mask removes tokens before sampling."""
        return self.disallowed is not None or bool(self.bad_words) or self.matcher is not None

    def banned_words_now(self) -> list[int]:
        """bad_words (vLLM's rule): a word's last token is banned when the output ends with the rest."""
        banned = []
        output = self.output_token_ids
        for word in self.bad_words:
            prefix = word[:-1]
            if not prefix or (len(output) >= len(prefix) and output[len(output) - len(prefix) :] == prefix):
                if 0 <= word[-1] < self.vocab_size:
                    banned.append(word[-1])
        return banned

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def prompt_logprob_rows(self, start: int, num_tokens: int) -> tuple[int, int]:
        """Of the positions ``[start, start + num_tokens)`` a step computes, those whose logits rows
        give prompt logprobs still owed: ``(first, end)``, empty when ``first >= end``. Row ``p``
        predicts prompt token ``p + 1``; the last prompt position predicts the first output token."""
        if self.prompt_logprob_targets is None:
            return 0, 0
        return max(start, self.next_prompt_logprob_row), min(start + num_tokens, self.num_prompt_tokens - 1)

    @property
    def blocks_stop_tokens(self) -> bool:
        """True while min_tokens still forbids the tokens that would stop the request."""
        return bool(self.min_tokens_blocked_ids) and len(self.output_token_ids) < self.params.min_tokens

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits first: the argmax of the raw logits."""
        return (
            self.greedy
            and not self.uses_penalties
            and not self.blocks_stop_tokens
            and not self.constrained
            and self.bias is None
        )

    def append(self, token_id: int) -> None:
        """Record one sampled output token (and advance the grammar by it)."""
        self.output_token_ids.append(token_id)
        if self.matcher is not None and not self.matcher.is_terminated():
            # The mask allowed only tokens the grammar accepts, so this succeeds; past the end
            # (ignore_eos) the matcher is terminated and the mask allows only eos.
            self.matcher.accept_token(token_id)
        if self.output_counts is not None and 0 <= token_id < self.vocab_size:
            # An int index is a view, so this is one small kernel and no host-device sync.
            self.output_counts[token_id] += 1


@dataclass(frozen=True)
class PromptLogprobRun:
    """One request's prompt positions ``[first_position, first_position + num_rows)``, the step's
    tokens ``[token_row, token_row + num_rows)``; their targets are the prompt tokens after them."""

    request_id: str
    state: SamplingState
    token_row: int
    first_position: int
    num_rows: int

    @property
    def target_ids(self) -> np.ndarray:
        assert self.state.prompt_logprob_targets is not None
        first = self.first_position + 1
        return self.state.prompt_logprob_targets[first : first + self.num_rows]


class Sampler:
    """Samples one token per row of a logits matrix; stateless apart from its configuration."""

    def __init__(self, vocab_size: int, device: torch.device | str, max_logprobs: int = 20) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.max_logprobs = max_logprobs
        # Stands in for the prompt mask of rows that have penalties but no repetition penalty.
        self._no_prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)

    def sample(
        self, logits: torch.Tensor, states: list[SamplingState]
    ) -> tuple[np.ndarray, list[proto.TokenLogprobs | None]]:
        """One token per row of ``logits`` ``[n, vocab]`` (rows aligned with ``states``).

        Returns the ``int32`` ids and, per row, its :class:`proto.TokenLogprobs` (``None`` when the
        request did not ask for logprobs). ``logits`` is not modified.
        """
        if logits.dim() != 2 or logits.shape[0] != len(states) or logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match {len(states)} requests "
                f"and a vocabulary of {self.vocab_size}."
            )
        if not states:
            return np.empty(0, dtype=np.int32), []
        if all(state.plain_greedy for state in states):
            # The common case: one kernel, no float32 copy (the conversion preserves order).
            sampled = logits.argmax(dim=-1)
        else:
            sampled = self._sample_processed(self.process_logits(logits, states), states)
        token_ids = sampled.to(torch.int32).cpu().numpy()
        logprob_rows = [i for i, state in enumerate(states) if state.params.logprobs is not None]
        if not logprob_rows:
            return token_ids, [None] * len(states)
        return token_ids, self._gather_logprobs(logits, sampled, states, logprob_rows)

    # ---------------------------------------------------------------- logits processing

    def process_logits(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """A float32 copy of ``logits`` after min_tokens masking and the penalties: what greedy
        rows take the argmax of and the others divide by their temperature."""
        processed = logits.to(torch.float32, copy=True)
        self._block_stop_tokens(processed, states)
        self._apply_logit_bias(processed, states)
        self._apply_penalties(processed, states)
        self._apply_masks(processed, states)
        self._end_rows_left_without_a_token(logits, processed, states)
        return processed

    def _end_rows_left_without_a_token(
        self, logits: torch.Tensor, processed: torch.Tensor, states: list[SamplingState]
    ) -> None:
        """A row every token of which is masked would sample token 0 (the argmax of -inf): a
        grammar that can only end under min_tokens, which forbids ending, or constraints that
        contradict each other (allowed_token_ids outside a choice). The constraints win over
        min_tokens: such a row is processed again without it. A row still without a token can only
        end: its eos ids are all it may sample (the request stops, or with ignore_eos goes on with
        eos). Checked on constrained rows only (one host-device sync where a mask is applied)."""
        rows = [i for i, state in enumerate(states) if state.constrained]
        if not rows:
            return
        empty = torch.isneginf(processed[self._row_index(rows)]).all(dim=1).tolist()
        dead = [i for i, none_left in zip(rows, empty) if none_left]
        relaxed = [i for i in dead if states[i].blocks_stop_tokens]
        if relaxed:
            index = self._row_index(relaxed)
            again = logits[index].to(torch.float32)
            subset = [states[i] for i in relaxed]
            self._apply_logit_bias(again, subset)
            self._apply_penalties(again, subset)
            self._apply_masks(again, subset)
            processed[index] = again
            still = dict(zip(relaxed, torch.isneginf(again).all(dim=1).tolist()))
            dead = [i for i in dead if still.get(i, True)]
        for i in dead:
            if states[i].eos_ids:
                processed[i] = float("-inf")
                processed[i, states[i].eos_ids] = 0.0

    def _apply_masks(self, logits: torch.Tensor, states: list[SamplingState]) -> None:
        """allowed_token_ids, bad_words and the grammar's next-token bitmask: -inf where masked."""
        allowed_rows = [i for i, state in enumerate(states) if state.disallowed is not None]
        if allowed_rows:
            disallowed = torch.stack([states[i].disallowed for i in allowed_rows])  # type: ignore[misc]
            index = self._row_index(allowed_rows)
            logits[index] = logits[index].masked_fill(disallowed, float("-inf"))
        rows: list[int] = []
        columns: list[int] = []
        for i, state in enumerate(states):
            if state.bad_words:
                banned = state.banned_words_now()
                rows.extend([i] * len(banned))
                columns.extend(banned)
        if rows:
            index = torch.tensor([rows, columns], dtype=torch.long).to(self.device, non_blocking=True)
            logits[index[0], index[1]] = float("-inf")
        grammar_rows = [i for i, state in enumerate(states) if state.matcher is not None]
        if grammar_rows:
            bitmask = allocate_bitmask(len(states), self.vocab_size)
            for i in grammar_rows:
                matcher = states[i].matcher
                if matcher.is_terminated():  # only reachable with ignore_eos: eos until max_tokens
                    end = torch.full((self.vocab_size,), float("-inf"), device=self.device)
                    end[states[i].eos_ids] = 0.0
                    logits[i] += end
                else:
                    matcher.fill_next_token_bitmask(bitmask, i)
            live = [i for i in grammar_rows if not states[i].matcher.is_terminated()]
            if live:
                apply_bitmask(logits, bitmask, live)

    def _column(self, values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
        """A per-row parameter as an ``[n, 1]`` device tensor (one host-to-device copy)."""
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True).unsqueeze(1)

    def _row_index(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def _block_stop_tokens(self, logits: torch.Tensor, states: list[SamplingState]) -> None:
        """min_tokens: eos and stop token ids get -inf while a request is below it."""
        rows: list[int] = []
        columns: list[int] = []
        for i, state in enumerate(states):
            if state.blocks_stop_tokens:
                rows.extend([i] * len(state.min_tokens_blocked_ids))
                columns.extend(state.min_tokens_blocked_ids)
        if rows:
            index = torch.tensor([rows, columns], dtype=torch.long).to(self.device, non_blocking=True)
            logits[index[0], index[1]] = float("-inf")

    def _apply_logit_bias(self, logits: torch.Tensor, states: list[SamplingState]) -> None:
        """logit_bias: each biased token's logit plus its bias, for every biased row in one
        indexed add (each row's ids are distinct)."""
        biased = [(i, state.bias) for i, state in enumerate(states) if state.bias is not None]
        if not biased:
            return
        rows = torch.cat([torch.full_like(ids, i) for i, (ids, _) in biased])
        columns = torch.cat([ids for _, (ids, _) in biased])
        values = torch.cat([values for _, (_, values) in biased])
        logits.index_put_((rows, columns), values, accumulate=True)

    def _apply_penalties(self, logits: torch.Tensor, states: list[SamplingState]) -> None:
        """vLLM's ``apply_penalties``: repetition (HF style: divide positive logits, multiply
        negative ones) over prompt and output tokens, then ``- frequency * count`` and
        ``- presence * (count > 0)`` over output tokens."""
        rows = [i for i, state in enumerate(states) if state.uses_penalties]
        if not rows:
            return
        penalised = [states[i] for i in rows]
        all_rows = len(rows) == len(states)
        index = None if all_rows else self._row_index(rows)
        values = logits if index is None else logits[index]
        counts = torch.stack([state.output_counts for state in penalised])  # type: ignore[misc]
        in_output = counts > 0

        repetition = [state.params.repetition_penalty for state in penalised]
        if any(penalty != 1.0 for penalty in repetition):
            prompt_masks = [
                state.prompt_mask if state.prompt_mask is not None else self._no_prompt_mask
                for state in penalised
            ]
            seen = torch.stack(prompt_masks) | in_output
            penalty = self._column(repetition, torch.float32)
            penalised_values = torch.where(values > 0, values / penalty, values * penalty)
            values = torch.where(seen, penalised_values, values)

        frequency = [state.params.frequency_penalty for state in penalised]
        if any(frequency):
            values = values - self._column(frequency, torch.float32) * counts
        presence = [state.params.presence_penalty for state in penalised]
        if any(presence):
            values = values - self._column(presence, torch.float32) * in_output

        if index is None:
            logits.copy_(values)
        else:
            logits[index] = values

    # ---------------------------------------------------------------- sampling

    def _sample_processed(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        greedy = [state.greedy for state in states]
        if all(greedy):
            return logits.argmax(dim=-1)
        greedy_ids = logits.argmax(dim=-1) if any(greedy) else None

        # Greedy rows go through the random path with neutral parameters and are replaced at the end.
        temperatures = [1.0 if state.greedy else state.params.temperature for state in states]
        if any(t != 1.0 for t in temperatures):
            logits.div_(self._column(temperatures, torch.float32))

        min_p = [0.0 if state.greedy else state.params.min_p for state in states]
        if any(min_p):
            self._apply_min_p(logits, min_p)

        top_k = [self._effective_top_k(state) for state in states]
        top_p = [1.0 if state.greedy else state.params.top_p for state in states]
        use_top_k = any(k < self.vocab_size for k in top_k)
        use_top_p = any(p < 1.0 for p in top_p)
        if use_top_p:
            self._apply_top_k_top_p(logits, top_k if use_top_k else None, top_p)
        elif use_top_k:
            self._apply_top_k_only(logits, top_k)

        probs = logits.softmax(dim=-1)
        sampled = self._exponential_race(probs, states)
        if greedy_ids is None:
            return sampled
        is_greedy = torch.tensor(greedy, dtype=torch.bool).to(self.device, non_blocking=True)
        return torch.where(is_greedy, greedy_ids, sampled)

    def _effective_top_k(self, state: SamplingState) -> int:
        k = state.params.top_k
        if state.greedy or k <= 0:  # 0 and -1 both mean off
            return self.vocab_size
        return min(k, self.vocab_size)

    def _apply_min_p(self, logits: torch.Tensor, min_p: list[float]) -> None:
        """Drop tokens whose probability is below ``min_p`` times the most likely token's."""
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * self._column(min_p, torch.float32)
        logits.masked_fill_(probs < threshold, float("-inf"))

    def _apply_top_k_only(self, logits: torch.Tensor, top_k: list[int]) -> None:
        """Keep each row's k largest logits (ties at the k-th value are all kept, as in vLLM);
        a topk of the largest k in the batch instead of a full sort."""
        max_k = max(k for k in top_k if k < self.vocab_size)
        # Rows without top-k read column 0 and get a -inf threshold, so nothing is dropped.
        kth = [k - 1 if k < self.vocab_size else 0 for k in top_k]
        thresholds = logits.topk(max_k, dim=-1).values.gather(1, self._column(kth, torch.long))
        off = [k >= self.vocab_size for k in top_k]
        if any(off):
            thresholds.masked_fill_(self._column(off, torch.bool), float("-inf"))
        logits.masked_fill_(logits < thresholds, float("-inf"))

    def _apply_top_k_top_p(self, logits: torch.Tensor, top_k: list[int] | None, top_p: list[float]) -> None:
        """vLLM's ``apply_top_k_top_p``: sort ascending, mask below the k-th largest, then mask the
        low tail whose cumulative probability is at most ``1 - p`` (always keeping the best)."""
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        if top_k is not None:
            kth_position = self._column([self.vocab_size - k for k in top_k], torch.long)
            kth_values = sorted_logits.gather(1, kth_position)
            sorted_logits.masked_fill_(sorted_logits < kth_values, float("-inf"))
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - self._column(top_p, torch.float32)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
        logits.scatter_(dim=-1, index=order, src=sorted_logits)

    def _exponential_race(self, probs: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """``argmax(probs / q)`` with ``q ~ Exponential(1)`` picks token i with probability
        ``probs[i]``. Seeded rows draw ``q`` from their own generator, a full row per step, so their
        stream does not depend on the batch; the rest share one draw from torch's default generator
        (seeded by the engine at start)."""
        noise = torch.empty_like(probs)
        seeded = [(i, state.generator) for i, state in enumerate(states) if state.generator is not None]
        if len(seeded) < len(states):
            noise.exponential_()
        for i, generator in seeded:
            noise[i].exponential_(generator=generator)
        noise.clamp_(min=_TINY)
        return probs.div_(noise).argmax(dim=-1)

    # ---------------------------------------------------------------- logprobs

    def prompt_logprobs(self, logits: torch.Tensor, runs: list[PromptLogprobRun]) -> list[proto.PromptLogprobs]:
        """One :class:`proto.PromptLogprobs` per run; ``logits`` holds the runs' rows, in order.
        Advances each run's request past the positions it covers."""
        if not runs:
            return []
        targets = np.concatenate([run.target_ids for run in runs])
        target_ids = torch.from_numpy(targets).to(self.device, non_blocking=True).unsqueeze(1)
        logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
        target_logprobs = logprobs.gather(1, target_ids)
        # Rank 1 is the most likely token (vLLM counts the tokens strictly more likely, plus one).
        ranks = (logprobs > target_logprobs).sum(dim=-1).to(torch.int32) + 1
        num_top = [min(run.state.params.prompt_logprobs or 0, self.max_logprobs, self.vocab_size) for run in runs]
        top_values = top_ids = None
        if max(num_top):
            top = logprobs.topk(max(num_top), dim=-1)
            top_values, top_ids = top.values.cpu().numpy(), top.indices.to(torch.int32).cpu().numpy()
        target_values = target_logprobs.squeeze(1).cpu().numpy()
        rank_values = ranks.cpu().numpy()
        results = []
        row = 0
        for run, k in zip(runs, num_top):
            rows = slice(row, row + run.num_rows)
            results.append(
                proto.PromptLogprobs(
                    request_id=run.request_id,
                    first_position=run.first_position + 1,
                    token_logprobs=proto.pack_f32(target_values[rows]),
                    ranks=proto.pack_i32(rank_values[rows]),
                    num_top=k,
                    top_ids=proto.pack_i32(top_ids[rows, :k]) if k and top_ids is not None else b"",
                    top_logprobs=proto.pack_f32(top_values[rows, :k]) if k and top_values is not None else b"",
                )
            )
            run.state.next_prompt_logprob_row = run.first_position + run.num_rows
            row += run.num_rows
        return results

    def _gather_logprobs(
        self,
        logits: torch.Tensor,
        sampled: torch.Tensor,
        states: list[SamplingState],
        rows: list[int],
    ) -> list[proto.TokenLogprobs | None]:
        """Logprobs of the raw logits (vLLM's default ``raw_logprobs``): the sampled token's and the
        k best, best first."""
        if len(rows) == len(states):
            raw, sampled_rows = logits, sampled
        else:
            index = self._row_index(rows)
            raw, sampled_rows = logits[index], sampled[index]
        logprobs = raw.log_softmax(dim=-1, dtype=torch.float32)
        sampled_column = logprobs.gather(1, sampled_rows.long().unsqueeze(1))
        sampled_logprobs = sampled_column.squeeze(1).cpu().tolist()
        # The sampled token's rank, as vLLM computes it: 1 + the tokens strictly more likely.
        ranks = ((logprobs > sampled_column).sum(dim=1) + 1).cpu().tolist()
        num_top = [min(states[i].params.logprobs or 0, self.max_logprobs, self.vocab_size) for i in rows]
        # topk returns its values sorted, best first (ties in an unspecified order).
        top = logprobs.topk(max(num_top), dim=-1)
        top_values = top.values.cpu().numpy()
        top_ids = top.indices.to(torch.int32).cpu().numpy()

        results: list[proto.TokenLogprobs | None] = [None] * len(states)
        for j, (i, k) in enumerate(zip(rows, num_top)):
            results[i] = proto.TokenLogprobs(
                logprob=sampled_logprobs[j],
                top_ids=proto.pack_i32(top_ids[j, :k]),
                top_logprobs=proto.pack_f32(top_values[j, :k]),
                rank=ranks[j],
            )
        return results
