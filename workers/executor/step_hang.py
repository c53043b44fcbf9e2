"""TEST ONLY: a forward pass that never returns, to test the step deadline (``step_deadline.py``).

``PIED_TEST_HANG_STEP=N`` makes the executor's compute thread block when it is handed step ``N``
(the scheduler's ``step_id``, from 0), as a CUDA or copy deadlock would. The executor actor reads it
once, when it is made; worker processes inherit it from the daemon. Nothing but tests sets it.

The blocked pass returns (raising) once the executor stops: a thread engine lives in the test's
process, and Python joins every compute thread at interpreter exit.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

import proto

logger = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "PIED_TEST_HANG_STEP"


class StepHangReleased(RuntimeError):
    """The blocked pass was let go because the executor stopped."""


class StepHang:
    def __init__(self, step_id: int) -> None:
        self.step_id = step_id
        self._released = threading.Event()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> StepHang | None:
        value = (os.environ if environ is None else environ).get(ENVIRONMENT_VARIABLE, "")
        if not value:
            return None
        if not value.isdigit():
            raise ValueError(f"{ENVIRONMENT_VARIABLE} must be a step id (an integer >= 0), got {value!r}.")
        logger.warning("%s=%s: step %s will hang (a test-only fault)", ENVIRONMENT_VARIABLE, value, value)
        return cls(int(value))

    def before_step(self, plan: proto.StepPlan) -> None:
        """On the compute thread, before the forward pass: block if this is the step to hang."""
        if plan.step_id != self.step_id:
            return
        logger.warning("step %d hangs (%s)", plan.step_id, ENVIRONMENT_VARIABLE)
        self._released.wait()
        raise StepHangReleased(f"step {plan.step_id} was released: the executor stopped")

    def release(self) -> None:
        self._released.set()
