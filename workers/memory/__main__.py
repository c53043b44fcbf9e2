"""Process entry point: ``python -m workers.memory '<WorkerArgs JSON>'`` (started by pied.supervisor)."""

import sys

from workers.actor import worker_main
from workers.memory.actor import MemoryActor

if __name__ == "__main__":
    sys.exit(worker_main("memory", MemoryActor.from_args))
