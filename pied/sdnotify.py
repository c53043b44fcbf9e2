"""sd_notify(3) in pure Python: tell systemd (``Type=notify``) how the daemon is doing.

No libsystemd: a notification is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). The environment is
read once, when the :class:`Notifier` is made; outside systemd every method is a no-op.

What pied sends (see ``pied.serve``):

- ``STATUS=...`` while loading and, every few seconds, while serving (``systemctl status`` shows it);
- ``EXTEND_TIMEOUT_USEC=...`` while workers load, so a large model may take longer than
  ``TimeoutStartSec`` as long as loading makes progress (the supervisor's own startup timeout
  still bounds it), and once at the start of a drain, so ``--shutdown-timeout`` wins over a
  shorter ``TimeoutStopSec``;
- ``READY=1`` once every worker is up, the model is loaded and the port is open;
- ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` while every worker's heartbeat is fresh;
- ``STOPPING=1`` when shutdown begins.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

# Variables the service manager meant for this process only: worker processes must not inherit
# them (with NotifyAccess=all a worker could otherwise report READY or feed the watchdog).
SYSTEMD_ONLY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
UNHEALTHY_RECHECK_SECONDS = 0.25


def socket_address(notify_socket: str) -> str | None:
    """The ``sendto`` address for ``$NOTIFY_SOCKET``; None when it is unset or of a kind we do not
    speak (``vsock:``, sent by VMs' service managers)."""
    if notify_socket.startswith("@"):
        return "\0" + notify_socket[1:]  # Linux abstract namespace
    if notify_socket.startswith("/"):
        return notify_socket
    return None


class Notifier:
    """One service's channel to systemd. Use one per process, made at start."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        notify_socket = environ.get("NOTIFY_SOCKET", "")
        self.address = socket_address(notify_socket)
        if notify_socket and self.address is None:
            logger.warning(
                "NOTIFY_SOCKET=%r is not a path or an abstract socket; not notifying", notify_socket
            )
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is for; without it, it is for us.
        for_us = not watchdog_pid or watchdog_pid == str(os.getpid())
        usec = int(watchdog_usec) if watchdog_usec.isdigit() else 0
        # Half the timeout, as sd_watchdog_enabled(3) advises: one late ping is not yet fatal.
        self.watchdog_interval: float | None = usec / 2e6 if usec > 0 and for_us and self.address else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; False if not sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
        except OSError as error:
            # systemd gone or restarting: the daemon keeps serving; the next message may get through.
            logger.warning("sd_notify(%s) failed: %s", fields[0] if fields else "", error)
            return False
        return True

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={one_line(text)}")

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={one_line(status)}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={one_line(status)}")

    def extend_timeout(self, seconds: float, status: str | None = None) -> bool:
        """Ask for ``seconds`` more before the current start/stop timeout fires (never shortens it)."""
        fields = [f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1e6))}"]
        if status is not None:
            fields.append(f"STATUS={one_line(status)}")
        return self.notify(*fields)

    async def run_watchdog(self, healthy: Callable[[], bool]) -> None:
        """Ping ``WATCHDOG=1`` every interval while ``healthy()``; skip the ping otherwise.

        NOTE: the pings come from the frontend's event loop, so a wedged loop stops them too. A
        skipped ping is not yet a restart: systemd acts after a whole ``WatchdogSec`` without one.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        # While unhealthy, look again soon: a worker that recovers (a long GC pause, SIGCONT)
        # should not wait a whole interval, which could add up to the full timeout.
        recheck = min(interval, UNHEALTHY_RECHECK_SECONDS)
        while True:
            if healthy():
                self.notify("WATCHDOG=1")
                await asyncio.sleep(interval)
            else:
                await asyncio.sleep(recheck)


def one_line(text: str) -> str:
    """STATUS is one line: a newline would start a new (bogus) assignment."""
    return " ".join(text.split())
