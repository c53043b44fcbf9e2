"""Process entry point: ``python -m workers.executor '<WorkerArgs JSON>'`` (started by pied.supervisor)."""

import sys

from workers.actor import worker_main
from workers.executor.actor import ExecutorActor

if __name__ == "__main__":
    sys.exit(worker_main("executor", ExecutorActor.from_args))
