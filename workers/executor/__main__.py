"""Process entry point: ``python -m workers.executor '<WorkerArgs JSON>'`` (started by pied.supervisor)."""

import sys

# Before the loop starts heartbeating: importing torch holds the GIL in C code for long stretches,
# which would read as a hung worker.
import workers.executor.runner  # noqa: F401
from workers.actor import worker_main
from workers.executor.actor import ExecutorActor

if __name__ == "__main__":
    sys.exit(worker_main("executor", ExecutorActor.from_args))
