"""Nudges between threads of one process: the API and the reconciler."""

from __future__ import annotations

import threading


class Notifier:
    """A counter that waiters can block on until it moves.

    Used in both directions: the API tells the reconciler that something is
    wanted, and the reconciler tells waiting requests that something changed.
    Waiters always re-read the metadata store afterwards, so a missed or
    spurious nudge only costs latency, never correctness.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._generation = 0

    def notify(self) -> None:
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    def wait(self, timeout: float) -> bool:
        """Block until the next ``notify`` or ``timeout``; True when notified."""
        with self._condition:
            seen = self._generation
            return self._condition.wait_for(lambda: self._generation != seen, timeout)
