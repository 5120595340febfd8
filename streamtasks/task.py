"""A registered task: a function, its name, its queue and how it runs."""

from __future__ import annotations

import dataclasses
import inspect
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, TypeVar, cast

from streamtasks import context
from streamtasks.errors import ConfigError, Retry, TaskError
from streamtasks.retry import RetryPolicy
from streamtasks.timeutil import epoch_ms

if TYPE_CHECKING:
    from streamtasks.app import App
    from streamtasks.context import Request
    from streamtasks.result import AsyncResult
    from streamtasks.signature import Canvas, Signature

P = ParamSpec("P")
R = TypeVar("R")

#: Options a call accepts, under their documented (Celery) names.
CALL_OPTIONS = (
    "queue", "key", "task_id", "countdown", "eta", "expires", "link", "link_error",
    "max_retries", "backoff", "backoff_s", "deadline_s", "confirm",
)

#: Older spellings, still accepted without a warning; the Celery name is documented.
OPTION_ALIASES = {"countdown_s": "countdown", "expires_s": "expires"}

#: Celery's call options that streamtasks refuses, with why (shown in the error).
REFUSED_OPTIONS = {
    "priority": "a Kafka partition is a log read in order; send urgent work to its own "
                "queue instead",
    "routing_key": "there is no AMQP routing; use queue= (and key= for the partition)",
    "exchange": "there is no AMQP exchange; use queue=",
    "serializer": "every task is encoded by the App's codec (Avro), not per call",
    "compression": "compression is a Kafka producer setting, not a per-call option",
    "shadow": "a task is recorded under its registered name only",
    "headers": "record headers are written by streamtasks (ids, tracing)",
    "retry": "the Kafka producer retries sends itself; use confirm=True to wait for it",
    "retry_policy": "the Kafka producer retries sends itself; use confirm=True to wait "
                    "for it",
    "ignore_result": "every task's outcome is written to the result backend",
    "time_limit": "a time limit is set per task, not per call: "
                  "@app.task(time_limit=...)",
    "soft_time_limit": "a soft time limit is set per task, not per call: "
                       "@app.task(pool='process', soft_time_limit=...)",
    "add_to_parent": "results are not collected into a parent",
    "reply_to": "results go to the result backend, not to a reply queue",
    "delivery_mode": "every task is written to Kafka durably",
    "mandatory": "there is no AMQP routing",
    "immediate": "there is no AMQP routing",
    "producer": "the App owns its producer",
    "connection": "the App owns its broker connection",
}


def unsupported_option(
    where: str, option: str, accepted: Sequence[str], kind: str = ""
) -> ConfigError:
    """Return the error for an option a call does not take: refused or unknown.

    Args:
        where: what was called (shown first in the message).
        option: the option given.
        accepted: the options that call takes, named in the message.
        kind: what the options are of (``"signature "``), shown before "option".
    """
    why = REFUSED_OPTIONS.get(option)
    if why is not None:
        return ConfigError(
            f"{where}: unknown {kind}option {option!r}: Celery has it, streamtasks does "
            f"not support it ({why})"
        )
    return ConfigError(
        f"{where}: unknown {kind}option {option!r}; accepted: {', '.join(sorted(accepted))}"
    )


def take_aliases(where: str, legacy: Mapping[str, Any], accepted: Sequence[str]) -> dict[str, Any]:
    """Return the older spellings in ``legacy`` under their documented names.

    Raises:
        ConfigError: an option refused by streamtasks or unknown (named in the message).
    """
    taken: dict[str, Any] = {}
    for option, value in legacy.items():
        if option not in OPTION_ALIASES:
            raise unsupported_option(where, option, accepted)
        taken[OPTION_ALIASES[option]] = value
    return taken


def one_of(where: str, option: str, documented: Any, aliases: Mapping[str, Any]) -> Any:
    """Return the value given under ``option`` or its older spelling, refusing both.

    Raises:
        ConfigError: both spellings were given.
    """
    alias = aliases.get(option)
    if documented is not None and alias is not None:
        raise ConfigError(f"{where}: give {option} or {option}_s, not both")
    return documented if documented is not None else alias


#: A failure or retry hook: ``hook(request, exc, traceback_text)``.
ErrorHook = Callable[["Request", BaseException, str], object]
#: A success hook: ``hook(request, result)``.
SuccessHook = Callable[["Request", Any], object]


@dataclass(frozen=True, slots=True)
class TaskHooks:
    """Functions a worker calls after a run of the task (see ``docs/celery.md``).

    A hook that raises is logged; it never changes the task's outcome.

    Attributes:
        on_failure: called with ``(request, exc, traceback)`` when the task failed for
            good (no retry left, or an error that is not retried).
        on_retry: called with ``(request, exc, traceback)`` when a retry is scheduled.
        on_success: called with ``(request, result)`` when the task succeeded.
    """

    on_failure: ErrorHook | None = None
    on_retry: ErrorHook | None = None
    on_success: SuccessHook | None = None


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """How a task runs.

    Attributes:
        queue: the queue it is sent to unless the call names another.
        ordered: records of one key run one after another (in partition order).
        time_limit_s: an ``async def`` task is cancelled, a ``pool="process"`` task's
            process killed, after this many seconds (``time_limit``).
        retry: when and how a failure is tried again.
        bind: the function gets the task as its first argument (``self``).
        track_started: a STARTED row is written as soon as a run starts (otherwise only
            for a run still going after ``track_started_after_ms``).
        hooks: functions called after a run (``on_failure``, ``on_retry``, ``on_success``).
        soft_time_limit_s: a ``pool="process"`` task gets ``SoftTimeLimitExceeded``
            raised inside after this many seconds.
        pool: ``thread`` (sync tasks, default) or ``process`` (a child process).
        rate_limit: runs started per second per worker process (None: no limit).
        group_rate_limit: runs started per second by the queue's whole group.
    """

    queue: str
    ordered: bool = False
    time_limit_s: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    bind: bool = False
    track_started: bool = False
    hooks: TaskHooks = field(default_factory=TaskHooks)
    soft_time_limit_s: float | None = None
    pool: str = "thread"
    rate_limit: float | None = None
    group_rate_limit: float | None = None


class Task(Generic[P, R]):
    """A function registered with an :class:`~streamtasks.App` under a name.

    Calling the task runs the function here and now; :meth:`delay` and
    :meth:`apply_async` send it to a queue for a worker.

    A task registered with ``bind=True`` gets this object as its first argument
    (``self``): :attr:`request` is the run's context and :meth:`retry` asks for another
    attempt, as in Celery.

    Attributes:
        fn: what a run calls with the message's arguments (for a bound task, the
            function with the task bound as ``self``).
    """

    def __init__(
        self, app: App, fn: Callable[..., R], name: str, options: TaskOptions
    ) -> None:
        self.app = app
        self.name = name
        self.options = options
        self.fn: Callable[P, R] = cast(
            "Callable[P, R]", types.MethodType(fn, self) if options.bind else fn
        )
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    @property
    def request(self) -> Request:
        """The context of this task's run in progress (Celery's ``self.request``).

        Raises:
            TaskError: the task is not running in a worker in this thread.
        """
        run = context.running()
        if run is None or run.task is not self:
            raise TaskError(
                f"{self.name}: request is only known while the task runs in a worker "
                "(read it inside the task)"
            )
        return run.request

    def retry(
        self,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        exc: BaseException | None = None,
        max_retries: int | None = None,
        reason: str = "",
        **refused: Any,
    ) -> NoReturn:
        """Ask for another attempt later, as Celery's ``self.retry``: raises :class:`Retry`.

        Args:
            countdown: seconds before the next attempt (default: the task's backoff).
            eta: the time of the next attempt instead (naive: UTC).
            exc: the error that caused the retry; when no retry is left the task fails
                with it (its type, message and traceback), as in Celery.
            max_retries: the retries this task may have, instead of its own.
            reason: why, kept in the RETRY row.
            **refused: Celery's other arguments (``args``, ``kwargs``, ``throw``, ...):
                refused, naming the argument.

        Raises:
            Retry: always (raise it on: ``raise self.retry(...)`` reads as in Celery).
            ConfigError: ``countdown`` with ``eta``, or an argument streamtasks refuses.
        """
        if refused:
            name = sorted(refused)[0]
            raise ConfigError(
                f"{self.name}.retry: unknown argument {name!r}; a retry runs the same "
                "message again (accepted: countdown, eta, exc, max_retries, reason)"
            )
        if eta is not None:
            if countdown is not None:
                raise ConfigError(f"{self.name}.retry: give countdown or eta, not both")
            countdown = max(0.0, (epoch_ms(eta) - time.time() * 1000) / 1000)
        raise Retry(countdown, exc, max_retries, reason=reason) from exc

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

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Send the task with these arguments to its queue; return at once.

        Raises:
            ArgumentError: the arguments do not fit the function's signature.
            EncodeError: an argument has a type that cannot be sent.
        """
        # apply_async with no option, without its layer of keyword arguments
        return self.app.send(self.name, args, kwargs, queue=self.options.queue, _task=self)

    def apply_async(
        self,
        args: Sequence[Any] | None = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        key: str | None = None,
        task_id: str | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        link: Canvas | Sequence[Canvas] | None = None,
        link_error: Canvas | Sequence[Canvas] | None = None,
        max_retries: int | None = None,
        backoff: str | None = None,
        backoff_s: float | None = None,
        deadline_s: float | None = None,
        confirm: bool = False,
        **legacy: Any,
    ) -> AsyncResult[R]:
        """Send the task with options (Celery's names); see :meth:`App.send`.

        Raises:
            ConfigError: an option streamtasks refuses (``priority``, ...) or does not
                know; the message names it.
        """
        return self.app.send(
            self.name,
            args=args,
            kwargs=kwargs,
            queue=queue or self.options.queue,
            key=key,
            task_id=task_id,
            countdown=countdown,
            eta=eta,
            expires=expires,
            link=link,
            link_error=link_error,
            max_retries=max_retries,
            backoff=backoff,
            backoff_s=backoff_s,
            deadline_s=deadline_s,
            confirm=confirm,
            _task=self,
            **legacy,
        )
