"""Process entry point: ``python -m workers.scheduler '<WorkerArgs JSON>'`` (started by pied.supervisor)."""

import sys

from workers.actor import worker_main
from workers.scheduler.actor import SchedulerActor

if __name__ == "__main__":
    sys.exit(worker_main("scheduler", SchedulerActor.from_args))
