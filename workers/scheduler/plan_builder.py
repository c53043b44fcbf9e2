"""The step plan the executor runs: a scheduled batch packed into the flat int32 arrays of a
``StepPlan`` (built as lists and arrays, converted to bytes once), with the requests the executor
sees for the first time, the requests it can forget, and the swaps gathered since the last plan.
"""

from __future__ import annotations

from array import array

from proto import NewRequestData, StepPlan
from workers.scheduler.request import Request

# One scheduled request: (request, tokens it computes this step, whether it samples a token).
Scheduled = tuple[Request, int, bool]


def build_step_plan(
    step_id: int,
    scheduled: list[Scheduled],
    finished_request_ids: list[str],
    swap_out: bytes,
    swap_in: bytes,
) -> StepPlan:
    """The plan for ``scheduled``; a request in it for the first time is sent whole
    (``new_requests``) and marked ``executor_has_state``."""
    request_ids = []
    num_scheduled_tokens = array("i")
    token_ids = array("i")
    start_positions = array("i")
    num_blocks = array("i")
    block_tables = array("i")
    sample = bytearray()
    new_requests = []
    for request, num_new, samples in scheduled:
        start = request.num_computed_tokens
        request_ids.append(request.request_id)
        num_scheduled_tokens.append(num_new)
        if num_new == 1:
            token_ids.append(request.token_ids[start])
        else:
            token_ids.extend(request.token_ids[start : start + num_new])
        start_positions.append(start)
        num_blocks.append(len(request.block_table))
        block_tables.extend(request.block_table)
        sample.append(samples)
        if not request.executor_has_state:
            request.executor_has_state = True
            new_requests.append(
                NewRequestData(request.request_id, request.packed_prompt_token_ids, request.params)
            )
    return StepPlan(
        step_id=step_id,
        request_ids=request_ids,
        num_scheduled_tokens=num_scheduled_tokens.tobytes(),
        token_ids=token_ids.tobytes(),
        start_positions=start_positions.tobytes(),
        num_blocks=num_blocks.tobytes(),
        block_tables=block_tables.tobytes(),
        sample=bytes(sample),
        new_requests=new_requests,
        finished_request_ids=finished_request_ids,
        swap_out=swap_out,
        swap_in=swap_in,
    )
