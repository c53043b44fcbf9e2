"""Hand-made StepPlans for executor tests: sequences, their blocks, and the plan that schedules them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

import proto


@dataclass
class Chunk:
    """``token_ids`` of one request scheduled at positions ``start...``, with its whole block table."""

    request_id: str
    token_ids: Sequence[int]
    start: int
    block_ids: Sequence[int]
    sample: bool = True


def make_plan(
    chunks: Sequence[Chunk],
    step_id: int = 0,
    new_requests: Sequence[proto.NewRequestData] = (),
    finished_request_ids: Sequence[str] = (),
) -> proto.StepPlan:
    return proto.StepPlan(
        step_id=step_id,
        request_ids=[chunk.request_id for chunk in chunks],
        num_scheduled_tokens=proto.pack_i32([len(chunk.token_ids) for chunk in chunks]),
        token_ids=proto.pack_i32([t for chunk in chunks for t in chunk.token_ids]),
        start_positions=proto.pack_i32([chunk.start for chunk in chunks]),
        num_blocks=proto.pack_i32([len(chunk.block_ids) for chunk in chunks]),
        block_tables=proto.pack_i32([b for chunk in chunks for b in chunk.block_ids]),
        sample=bytes(int(chunk.sample) for chunk in chunks),
        new_requests=list(new_requests),
        finished_request_ids=list(finished_request_ids),
    )


def new_request(request_id: str, prompt: Sequence[int], **params) -> proto.NewRequestData:
    return proto.NewRequestData(request_id, proto.pack_i32(prompt), proto.SamplingParams(**params))


class BlockAllocator:
    """Hands out device block ids in a shuffled order, so tests never rely on contiguous blocks."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.free = [int(b) for b in np.random.default_rng(seed).permutation(num_blocks)]

    def allocate(self, num_tokens: int) -> list[int]:
        count = -(-num_tokens // self.block_size)
        blocks, self.free = self.free[:count], self.free[count:]
        assert len(blocks) == count, "test pool too small"
        return blocks


def all_row_logits(runner, plan: proto.StepPlan) -> torch.Tensor:
    """Logits for every scheduled token of ``plan`` (the runner itself only computes sampled rows)."""
    inputs = runner.prepare(plan)
    inputs.logits_indices = torch.arange(inputs.meta.num_tokens, device=runner.device)
    return runner.forward(inputs)
