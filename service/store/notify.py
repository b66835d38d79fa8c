"""Nudges between threads of one process: the API and the reconciler."""

from __future__ import annotations

import threading


class Notifier:
    """A counter that waiters can block on until it moves past what they saw.

    Used in both directions: the API tells the reconciler that something is
    wanted, and the reconciler tells waiting requests that something changed.
    Waiters always re-read the metadata store afterwards, so a spurious nudge
    costs a read, never correctness; passing the generation seen before that
    read means a nudge that lands in between is not missed either.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._generation = 0

    @property
    def generation(self) -> int:
        return self._generation

    def notify(self) -> None:
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    def notify_in(self, seconds: float) -> None:
        """``notify()`` once ``seconds`` have passed."""
        timer = threading.Timer(seconds, self.notify)
        timer.daemon = True
        timer.start()

    def wait(self, timeout: float, since: int | None = None) -> bool:
        """Block until the generation differs from ``since`` (default: now) or ``timeout``."""
        with self._condition:
            seen = self._generation if since is None else since
            return self._condition.wait_for(lambda: self._generation != seen, timeout)
