"""Progress lines that stay readable in any log.

In a terminal every update is printed (the caller decides the cadence: `log_every`, one line per
batch). In a non-TTY log (CI, `ray job logs`, a file) a `Progress` prints its first and last line
and at most one line per `NEON_RAY_PROGRESS_SECONDS` (default 30) in between. Ray workers are never
TTYs, so the driver tells them which case holds through `NEON_RAY_INTERACTIVE`.
"""

from __future__ import annotations

import os
import sys
import time

INTERACTIVE_ENV = "NEON_RAY_INTERACTIVE"
INTERVAL_ENV = "NEON_RAY_PROGRESS_SECONDS"


def interactive() -> bool:
    """True when progress goes to a person's terminal (set by the driver for its Ray workers)."""
    flag = os.environ.get(INTERACTIVE_ENV)
    if flag is not None:
        return flag == "1"
    return sys.stdout.isatty() and sys.stderr.isatty()


def emit(message: str) -> None:
    """One line on stdout. Ray Train V2 reroutes `print` through a logger that echoes it twice;
    writing to stdout directly gives one line on the driver."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


class Progress:
    """Throttled progress lines for one long loop (see the module docstring)."""

    def __init__(self, every_seconds: float | None = None):
        self.interval = 0.0 if interactive() else float(os.environ.get(INTERVAL_ENV, every_seconds or 30.0))
        self.last = -float("inf")

    def update(self, message: str, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self.last >= self.interval:
            self.last = now
            emit(message)
