"""Sampled-token feedback for async scheduling: the tokens the last step sampled, put in place of the
next plan's placeholders.

With ``--async-scheduling`` the scheduler makes the plan of step t+1 before step t's tokens reach it,
so a request that samples in t and decodes in t+1 has ``proto.PLACEHOLDER_TOKEN_ID`` as its token in
t+1 (``proto.StepPlan``). The executor runs plans in order and sampled step t itself, so it fills the
hole from what it sampled. On CUDA the tokens are on the host already when step t ends (the step's
one host synchronization is their copy for the StepResult), and the filled token ids reach the device
with the rest of step t+1's inputs in its one host-to-device copy: the feedback adds no
synchronization and no copy.
"""

from __future__ import annotations

import numpy as np

import proto


class SampledTokenFeedback:
    """What the last step sampled, by request (rank 0 only: the other ranks sample nothing)."""

    def __init__(self) -> None:
        self.step_id = -1
        self._request_ids: list[str] = []
        self._token_ids: list[int] = []

    def record(self, step_id: int, request_ids: list[str], token_ids: list[int]) -> None:
        """Step ``step_id`` sampled ``token_ids[i]`` for ``request_ids[i]`` (none: an empty list).
        Kept as given: only a plan with placeholders (async scheduling) looks them up."""
        self.step_id = step_id
        self._request_ids, self._token_ids = request_ids, token_ids

    def fill(self, plan: proto.StepPlan, token_ids: np.ndarray, query_lens: np.ndarray) -> np.ndarray:
        """``token_ids`` (the plan's, request by request, ``query_lens`` each) with every placeholder
        replaced by the token its request sampled in the step just before; the same array when the
        plan has none. Raises ValueError for a placeholder that the last step did not sample."""
        holes = np.flatnonzero(token_ids == proto.PLACEHOLDER_TOKEN_ID)
        if not len(holes):
            return token_ids
        if plan.step_id != self.step_id + 1:
            raise ValueError(
                f"step {plan.step_id} has sampled-token placeholders but the last step run was {self.step_id}."
            )
        owners = np.repeat(np.arange(len(query_lens)), query_lens)[holes].tolist()
        sampled = dict(zip(self._request_ids, self._token_ids))
        filled = token_ids.copy()
        for hole, owner in zip(holes.tolist(), owners):
            request_id = plan.request_ids[owner]
            token_id = sampled.get(request_id)
            if token_id is None or query_lens[owner] != 1:
                raise ValueError(
                    f"step {plan.step_id}: request {request_id!r} has a placeholder token, but step "
                    f"{self.step_id} sampled none for it, or it schedules more than that one token."
                )
            filled[hole] = token_id
        return filled
