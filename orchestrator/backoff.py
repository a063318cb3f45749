"""When a call that keeps failing is tried next: the reconciler loop's own passes, and each
data centre's calls. A module of its own because neither owns the rule: each keeps its own
state (one loop, one per data-centre site) and only the doubling is shared."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    """When a failing call is tried next, doubling up to a cap."""

    failures: int = 0
    next_try: float = 0.0
    last_error: str = ""
    since: float = 0.0  # when the first failure of this run of failures came

    def fail(self, now: float, error: str, base: float = 1.0, cap: float = 60.0) -> None:
        if not self.failures:
            self.since = now
        self.failures += 1
        self.next_try = now + min(cap, base * 2 ** (self.failures - 1))
        self.last_error = error
