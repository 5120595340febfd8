"""The context of a running task: its request, and the ids of the tasks it sends.

While a worker runs a task, a context variable holds the run (:class:`Running`): the
task reads it as ``self.request`` (``@app.task(bind=True)``) or, without ``bind``,
through :func:`current_task` (Celery's ``current_task``): ``current_task().request``.

Tasks sent from inside a run (``.delay()``, ``apply_async``, ``send_task``, a workflow's
``apply_async``) get ids derived from the running task's id and their position among the
run's sends (the n-th send gets ``uuid5(parent id + "child-n")``), so a run repeated after
a crash or a redelivery re-sends the same children instead of forking new ones. The
attempt is not part of the derivation: a retry attempt re-sends the children of the first
attempt under the same ids (a child that already ran runs again with its id, which is its
idempotency key). An explicit ``task_id=`` wins. Children carry ``parent_id`` (the running
task) and ``root_id`` (the running task's root, else its own id). A thread the task
starts sees none of this unless it runs in a copy of the task's context
(``contextvars.copy_context().run``): Python threads start with an empty context.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from streamtasks.message import TaskMessage, derived_task_id, new_task_id

if TYPE_CHECKING:
    from streamtasks.task import Task


@dataclass(frozen=True, slots=True)
class Request:
    """What a running task knows about its own run (Celery's ``self.request``).

    Attributes:
        id: the task id (the idempotency key under at-least-once delivery).
        name: the registered task name.
        queue: the queue it was consumed from.
        attempt: 1 for the first run, 2 for the first retry, ...
        retries: retries done before this run (``attempt - 1``, Celery's name).
        max_retries: the retries this call may have (the task's, the call's override, or
            the limit an earlier ``self.retry(max_retries=N)`` of this task named).
        parent_id: the task that sent this one, or None.
        root_id: the first task of the tree this one belongs to, or None.
        group_id: the group it is a member of, or None.
        eta: the time it was due (aware, UTC), or None.
        expires: the time after which it would not run (aware, UTC), or None.
        partition: the Kafka partition of its record (None outside a worker).
        offset: the offset of its record.
        hostname: the worker running it (``host:pid``).
        args: the positional arguments, as decoded.
        kwargs: the keyword arguments, as decoded.
    """

    id: str
    name: str
    queue: str
    attempt: int = 1
    retries: int = 0
    max_retries: int = 0
    parent_id: str | None = None
    root_id: str | None = None
    group_id: str | None = None
    eta: datetime | None = None
    expires: datetime | None = None
    partition: int | None = None
    offset: int | None = None
    hostname: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def retries_left(self) -> int:
        """How many more retries this task may have after this run."""
        return max(self.max_retries - self.retries, 0)


def _utc(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


class Running:
    """One run of a task in a worker: its message, record position and child counter.

    The :class:`Request` is built on first read, so a task that never reads it costs
    nothing more than setting the context variable.
    """

    __slots__ = ("_children", "_request", "hostname", "msg", "offset", "partition", "sent",
                 "task")

    def __init__(
        self, task: Task[Any, Any], msg: TaskMessage, partition: int | None = None,
        offset: int | None = None, hostname: str | None = None,
    ) -> None:
        self.task = task
        self.msg = msg
        self.partition = partition
        self.offset = offset
        self.hostname = hostname
        self._children = 0
        self._request: Request | None = None
        #: Ids of the tasks this run sent (confirmed before the run counts as done).
        self.sent: list[str] = []

    @property
    def request(self) -> Request:
        """The run's request (built once)."""
        if self._request is None:
            msg = self.msg
            try:
                max_retries = self.task.options.retry.with_options(msg.options).max_retries
            except (ValueError, TypeError):
                max_retries = self.task.options.retry.max_retries
            self._request = Request(
                id=msg.id, name=msg.name, queue=msg.queue, attempt=msg.attempt,
                retries=msg.attempt - 1, max_retries=max_retries, parent_id=msg.parent_id,
                root_id=msg.root_id, group_id=msg.group_id, eta=_utc(msg.eta_ms),
                expires=_utc(msg.expires_ms), partition=self.partition, offset=self.offset,
                hostname=self.hostname, args=tuple(msg.args), kwargs=dict(msg.kwargs),
            )
        return self._request

    def next_child_id(self) -> str:
        """Return the id of the next task this run sends (derived from its own id)."""
        self._children += 1
        return derived_task_id(self.msg.id, f"child-{self._children}")

    @property
    def root_id(self) -> str:
        """The root of this run's tree: its own root, else itself."""
        return self.msg.root_id or self.msg.id

    def confirm_sends(self) -> None:
        """Wait until the broker confirmed every task this run sent.

        Called when the task returns, before its outcome goes on: once the run is done
        its offset may advance, and a child still queued in this process would be lost
        by a crash then (nothing would run the parent again to re-send it).

        Raises:
            SendError: a child was refused or not confirmed in time.
        """
        if self.sent:
            self.task.app.confirm(self.sent)


_current: contextvars.ContextVar[Running | None] = contextvars.ContextVar(
    "streamtasks_running", default=None
)


def running() -> Running | None:
    """Return the run of the task executing in this context, or None."""
    return _current.get()


def set_running(run: Running) -> contextvars.Token[Running | None]:
    """Make ``run`` the running task of this context; return the token to reset it with."""
    return _current.set(run)


def reset_running(token: contextvars.Token[Running | None]) -> None:
    """Put back the running task :func:`set_running` replaced."""
    _current.reset(token)


@contextlib.contextmanager
def activated(run: Running | None) -> Iterator[None]:
    """Within the block, ``run`` is the running task of this thread (or asyncio task)."""
    if run is None:
        yield
        return
    token = _current.set(run)
    try:
        yield
    finally:
        _current.reset(token)


def current_task() -> Task[Any, Any] | None:
    """Return the task running in this context (Celery's ``current_task``), or None.

    Read its context as ``current_task().request`` (a :class:`Request`).
    """
    run = _current.get()
    return None if run is None else run.task


def child_task_id(task_id: str | None = None) -> str:
    """Return the id of a task sent now: ``task_id`` if given, else derived or fresh.

    Inside a running task the id is derived from the task's id and the send's position
    (see the module docstring); elsewhere it is a fresh UUID4.
    """
    if task_id:
        return task_id
    run = _current.get()
    return new_task_id() if run is None else run.next_child_id()


def link_to_parent(msg: TaskMessage) -> None:
    """Set ``parent_id`` / ``root_id`` of a message sent from inside a running task.

    The run also notes the message's id, to confirm it before the run counts as done.
    """
    run = _current.get()
    if run is None:
        return
    run.sent.append(msg.id)
    if msg.parent_id is None:
        msg.parent_id = run.msg.id
    if msg.root_id is None:
        msg.root_id = run.root_id
