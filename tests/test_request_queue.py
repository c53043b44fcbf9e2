"""The scheduler's waiting and swapped queues: FIFO order with O(1) removal from anywhere (issue 17:
aborting a queued request must not scan the queue)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import AddRequest, FinishReason, SamplingParams, pack_i32
from proto.config import EngineConfig
from workers.scheduler.request import Request
from workers.scheduler.request_queue import RequestQueue
from workers.scheduler.scheduler import Scheduler

NUM_QUEUED = 2000


def make_request(index: int) -> Request:
    message = AddRequest(f"r{index}", pack_i32([1, 2, 3]), SamplingParams(max_tokens=4))
    return Request.from_message(message, {0}, 64)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["append", "appendleft", "popleft", "remove"]), st.integers(0, 10**6)))
)
def test_the_queue_behaves_like_a_list(operations: list[tuple[str, int]]) -> None:
    queue = RequestQueue()
    model: list[Request] = []
    made = 0
    for operation, choice in operations:
        if operation in ("append", "appendleft"):
            request = make_request(made)
            made += 1
            getattr(queue, operation)(request)
            model.append(request) if operation == "append" else model.insert(0, request)
        elif operation == "popleft":
            if not model:
                with pytest.raises(IndexError):
                    queue.popleft()
                continue
            assert queue.popleft() is model.pop(0)
        elif model:
            request = model.pop(choice % len(model))
            queue.remove(request)
            assert request not in queue
        assert list(queue) == model
        assert len(queue) == len(model) and bool(queue) == bool(model)
        if model:
            assert queue.head() is model[0]
        # Empty slots never outnumber the requests by much: memory stays O(requests).
        assert len(queue._slots) <= 2 * len(model) + 16


def test_a_request_is_queued_once_and_removed_once() -> None:
    queue = RequestQueue()
    request = make_request(0)
    queue.append(request)
    with pytest.raises(ValueError, match="already queued"):
        queue.appendleft(request)
    queue.remove(request)
    with pytest.raises(KeyError):
        queue.remove(request)
    queue.appendleft(request)  # queued again after leaving (preempted, say)
    assert list(queue) == [request]


def test_aborting_thousands_of_queued_requests_compares_no_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """``deque.remove`` compares the request with every one before it; the queue must not. A request
    that refuses to be compared shows it: every abort below would raise on a scan."""
    config = EngineConfig(block_size=4, max_num_seqs=1, max_num_batched_tokens=64)
    scheduler = Scheduler(config, num_device_blocks=8, eos_token_ids={0}, max_model_len=64)
    for index in range(NUM_QUEUED + 1):
        assert scheduler.add_request(AddRequest(f"r{index}", pack_i32([1, 2, 3]), SamplingParams())) == []
    plan = scheduler.schedule()
    assert plan is not None and plan.request_ids == ["r0"]  # one seat: the rest wait
    assert scheduler.num_waiting == NUM_QUEUED

    def refuse(self: Request, other: object) -> bool:
        raise AssertionError("a request was compared: the abort scanned the queue")

    monkeypatch.setattr(Request, "__eq__", refuse)
    # Newest first, as clients that gave up disconnect; then some from the middle and the head.
    newest_first = [f"r{index}" for index in range(NUM_QUEUED, NUM_QUEUED // 2, -1)]
    deltas = scheduler.abort_requests(newest_first)
    middle = [f"r{index}" for index in range(2, NUM_QUEUED // 2 + 1, 2)]
    deltas += scheduler.abort_requests(middle)
    deltas += scheduler.abort_requests(["r1"])
    assert len(deltas) == len(newest_first) + len(middle) + 1
    assert all(delta.finish_reason == FinishReason.ABORT for delta in deltas)
    left = [f"r{index}" for index in range(3, NUM_QUEUED // 2 + 1, 2)]
    assert [request.request_id for request in scheduler.waiting] == left
    assert scheduler.num_waiting == len(left) and scheduler.num_running == 1
