"""A FIFO of requests (the scheduler's waiting and swapped queues) with O(1) removal from anywhere.

Aborting a queued request used to be ``deque.remove``, a scan of the queue: ten thousand queued
clients disconnecting at once cost a hundred million steps on the scheduler's loop and starved its
heartbeat. Here removal marks the request's slot empty; empty slots are dropped when they reach
either end, and the deque is compacted once they outnumber the requests (so the work stays O(1)
amortised per operation and the memory O(requests)).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from workers.scheduler.request import Request

# A slot is a one-element list: removal empties it in place, wherever it is in the deque.
Slot = list


class RequestQueue:
    """Requests in order; ``append``/``appendleft``/``popleft``/``head``/``remove`` in O(1) (amortised).
    A request is in at most one place of the queue at a time."""

    def __init__(self) -> None:
        self._slots: deque[Slot] = deque()
        self._slot_of: dict[Request, Slot] = {}  # by identity: Request defines no __eq__

    def __len__(self) -> int:
        return len(self._slot_of)

    def __bool__(self) -> bool:
        return bool(self._slot_of)

    def __contains__(self, request: Request) -> bool:
        return request in self._slot_of

    def __iter__(self) -> Iterator[Request]:
        """The requests in order (do not change the queue while iterating)."""
        for slot in self._slots:
            if slot:
                yield slot[0]

    def append(self, request: Request) -> None:
        self._slots.append(self._new_slot(request))

    def appendleft(self, request: Request) -> None:
        self._slots.appendleft(self._new_slot(request))

    def head(self) -> Request:
        """The first request; IndexError when empty."""
        self._drop_empty_head()
        return self._slots[0][0]

    def popleft(self) -> Request:
        """Remove and return the first request; IndexError when empty."""
        self._drop_empty_head()
        request = self._slots.popleft()[0]
        del self._slot_of[request]
        return request

    def remove(self, request: Request) -> None:
        """Take ``request`` out wherever it is; KeyError if it is not queued."""
        slot = self._slot_of.pop(request)
        slot.clear()
        slots = self._slots
        # Newest-first removals (clients giving up) never leave empty slots behind.
        while slots and not slots[-1]:
            slots.pop()
        if len(slots) > 2 * len(self._slot_of) + 16:
            self._slots = deque(slot for slot in slots if slot)

    def _new_slot(self, request: Request) -> Slot:
        if request in self._slot_of:
            raise ValueError(f"request {request.request_id!r} is already queued")
        slot = [request]
        self._slot_of[request] = slot
        return slot

    def _drop_empty_head(self) -> None:
        slots = self._slots
        while slots and not slots[0]:
            slots.popleft()
