"""Driver callbacks as futures: a window of concurrent reads, a chain of statements.

Both send every statement after the first from the driver's callback of one before, so
no thread waits on Cassandra. Callbacks run on the driver's I/O thread: they may send
the next statement, never wait.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from streamtasks.errors import BackendError

#: Concurrent reads of one fetch_many / group_results.
READ_WINDOW = 256

_T = TypeVar("_T")


class Gather(Generic[_T]):
    """Runs reads with at most ``READ_WINDOW`` in flight, each sent from a callback.

    Its future gets ``finish(pages)``, the rows of every statement in order (the first
    page: the reads here return at most a shard or a row), or the first error, as
    ``wrap(error, position of the statement)``. An error of ``finish`` fails it as is.
    """

    def __init__(
        self,
        session: Any,
        requests: Sequence[tuple[Any, tuple[Any, ...]]],
        wrap: Callable[[BaseException, int], BackendError],
        finish: Callable[[list[list[dict[str, Any]]]], _T],
    ) -> None:
        self.future: Future[_T] = Future()
        self._session = session
        self._requests = requests
        self._wrap = wrap
        self._finish = finish
        self._pages: list[list[dict[str, Any]]] = [[] for _ in requests]
        self._next = 0
        self._left = len(requests)
        self._over = False
        self._lock = threading.Lock()

    def start(self) -> Future[_T]:
        """Send the first window of reads; return the future."""
        if not self._requests:
            self._complete()
        for _ in range(min(READ_WINDOW, len(self._requests))):
            self._send_next()
        return self.future

    def _send_next(self) -> None:
        with self._lock:
            if self._over or self._next >= len(self._requests):
                return
            position = self._next
            self._next += 1
        statement, params = self._requests[position]
        try:
            response = self._session.execute_async(statement, params)
        except Exception as err:  # e.g. the session was shut down
            self._failed(err, position)
            return
        response.add_callbacks(
            self._succeeded, self._failed, callback_args=(position,), errback_args=(position,)
        )

    def _succeeded(self, rows: list[dict[str, Any]] | None, position: int) -> None:
        with self._lock:
            self._pages[position] = rows or []
            self._left -= 1
            last = self._left == 0 and not self._over
            self._over = self._over or last
        if last:
            self._complete()
        else:
            self._send_next()

    def _failed(self, err: BaseException, position: int) -> None:
        with self._lock:
            if self._over:
                return
            self._over = True
        self.future.set_exception(self._wrap(err, position))

    def _complete(self) -> None:
        try:
            value = self._finish(self._pages)
        except Exception as err:
            self.future.set_exception(err)
            return
        self.future.set_result(value)


def send_then(
    session: Any,
    statement: Any,
    params: tuple[Any, ...],
    future: Future[Any],
    wrap: Callable[[BaseException], BackendError],
    then: Callable[[Any], None],
) -> None:
    """Send a statement; on success call ``then(rows)``, on any error fail ``future``.

    ``then`` runs on the driver's I/O thread: it may send the next statement, never wait.
    """

    def failed(err: BaseException) -> None:
        if not future.done():
            future.set_exception(wrap(err))

    def succeeded(rows: Any) -> None:
        try:
            then(rows)
        except Exception as err:  # never let an error escape into the driver
            failed(err)

    try:
        response = session.execute_async(statement, params)
    except Exception as err:  # e.g. the session was shut down
        failed(err)
        return
    response.add_callbacks(succeeded, failed)
