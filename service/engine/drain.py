"""How fast a queue drains, measured only over the time something waited in it: the estimate that admission by
deadline rests on (Generate's batch rows, Score's tokens)."""
from __future__ import annotations

import math


class DrainRate:
    """Units of work done (sequences admitted to a batch row, Score tokens scored) per second of time during which
    some waited, both decayed with a time constant of `horizon_s` so the estimate follows the traffic of the last few
    seconds."""

    def __init__(self, horizon_s: float = 10.0):
        self.horizon_s = horizon_s
        self.busy_s = 0.0  # decayed seconds during which the queue was not empty
        self.admitted = 0.0  # decayed units done in them
        self._at: float | None = None
        self._waiting = False

    def _at_time(self, now: float) -> tuple[float, float]:
        """(busy_s, admitted) decayed to `now`, the time since the last tick counted as busy if some waited."""
        if self._at is None:
            return self.busy_s, self.admitted
        dt = max(0.0, now - self._at)
        f = math.exp(-dt / self.horizon_s)
        return self.busy_s * f + (dt if self._waiting else 0.0), self.admitted * f

    def tick(self, now: float, admitted: float, waiting_after: bool) -> None:
        """Whenever the queue changes: `admitted` units left it (done) since the last tick; `waiting_after` says
        whether some still wait (idle time, with nobody waiting, only decays the history)."""
        busy, done = self._at_time(now)
        self.busy_s, self.admitted = busy, done + admitted
        self._at, self._waiting = now, waiting_after

    def expected_wait(self, position: float, now: float, floor: float = 1.0) -> float | None:
        """Seconds until the first `position` units ahead are done (for rows: until the `position`-th waiter, 1 =
        next, gets one); None while nothing has been measured. While fewer than `floor` units were done in the
        window, as if `floor` had been done in the time it has been stuck: a lower bound that grows with it."""
        busy, done = self._at_time(now)
        if busy <= 0.0:
            return None
        return position * busy / max(done, floor)

    def rate(self, now: float) -> float:
        busy, done = self._at_time(now)
        return done / busy if busy > 0 else 0.0
