"""Wait for several asynchronous answers and act once, on the first error if any."""

from __future__ import annotations

import threading
from collections.abc import Callable


class FanIn:
    """Calls ``done`` once, after ``parts`` answers: with the first error, or None.

    Answers may come from any thread (driver callbacks, delivery reports). With
    ``parts`` 0, ``done(None)`` is called at once.
    """

    __slots__ = ("_done", "_error", "_left", "_lock")

    def __init__(self, parts: int, done: Callable[[BaseException | None], None]) -> None:
        self._left = parts
        self._done = done
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        if parts == 0:
            done(None)

    def one(self, error: BaseException | None) -> None:
        """One answer: None for a success, else its error."""
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            self._left -= 1
            if self._left:
                return
            error = self._error
        self._done(error)

    def succeeded(self, _result: object) -> None:
        """A success, as a callback that is given the result (e.g. the driver's rows)."""
        self.one(None)

    def failed(self, error: BaseException) -> None:
        """A failure, as an errback."""
        self.one(error)
