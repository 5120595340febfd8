"""A registered task: a function, its name, its queue and how it runs."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from streamtasks.retry import RetryPolicy

if TYPE_CHECKING:
    from streamtasks.app import App
    from streamtasks.result import AsyncResult
    from streamtasks.signature import Signature

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """How a task runs.

    Attributes:
        queue: the queue it is sent to unless the call names another.
        ordered: records of one key run one after another (in partition order).
        time_limit_s: an ``async def`` task is cancelled after this many seconds.
        retry: when and how a failure is tried again.
    """

    queue: str
    ordered: bool = False
    time_limit_s: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


class Task(Generic[P, R]):
    """A function registered with an :class:`~streamtasks.App` under a name.

    Calling the task runs the function here and now; :meth:`delay` and
    :meth:`apply_async` send it to a queue for a worker.
    """

    def __init__(self, app: App, fn: Callable[P, R], name: str, options: TaskOptions) -> None:
        self.app = app
        self.fn = fn
        self.name = name
        self.options = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function in this process (no queue, no result row)."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.options.queue}>"

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """Return a signature of a call (for workflows and callbacks).

        In a chain, the previous step's result is appended to ``args`` when it runs
        (see ``docs/workflows.md``).
        """
        from streamtasks.signature import Signature

        return Signature(self.name, args, kwargs, options={"queue": self.options.queue},
                         app=self.app)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """Return an immutable signature: it runs with exactly these arguments."""
        return dataclasses.replace(self.s(*args, **kwargs), immutable=True)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Send the task with these arguments to its queue; return at once.

        Raises:
            ArgumentError: the arguments do not fit the function's signature.
            EncodeError: an argument has a type that cannot be sent.
        """
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        key: str | None = None,
        task_id: str | None = None,
        countdown_s: float | None = None,
        eta: datetime | None = None,
        expires_s: float | None = None,
        max_retries: int | None = None,
        backoff: str | None = None,
        backoff_s: float | None = None,
        deadline_s: float | None = None,
        confirm: bool = False,
    ) -> AsyncResult:
        """Send the task with options; see :meth:`App.send` for the arguments."""
        return self.app.send(
            self.name,
            args=args,
            kwargs=kwargs,
            queue=queue or self.options.queue,
            key=key,
            task_id=task_id,
            countdown_s=countdown_s,
            eta=eta,
            expires_s=expires_s,
            max_retries=max_retries,
            backoff=backoff,
            backoff_s=backoff_s,
            deadline_s=deadline_s,
            confirm=confirm,
            _task=self,
        )
