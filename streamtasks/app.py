"""The application: task registry, sending, results; the entry point of the API."""

from __future__ import annotations

import atexit
import inspect
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from streamtasks import states, tracing
from streamtasks.backend.base import ResultBackend
from streamtasks.broker.base import Broker, TopicSpec
from streamtasks.codec import AvroCodec, Codec, check_arguments, to_json_text
from streamtasks.context import child_task_id, link_to_parent
from streamtasks.control import REVOKE_EXPIRES_S
from streamtasks.delays import next_hop
from streamtasks.errors import (
    ConfigError,
    MessageTooLargeError,
    SendError,
    StreamTasksError,
    UnknownTaskError,
)
from streamtasks.headers import task_headers
from streamtasks.logs import ensure_configured, get_logger
from streamtasks.message import TaskMessage, now_ms
from streamtasks.ratelimit import parse_rate
from streamtasks.result import AsyncResult, GroupResult
from streamtasks.retry import RetryPolicy, call_options
from streamtasks.schedules import Schedule, every_seconds
from streamtasks.settings import Settings
from streamtasks.signature import freeze_callbacks
from streamtasks.task import (
    CALL_OPTIONS,
    ErrorHook,
    SuccessHook,
    Task,
    TaskHooks,
    TaskOptions,
    one_of,
    take_aliases,
)
from streamtasks.timeutil import epoch_ms
from streamtasks.worker.procpool import check_pool

if TYPE_CHECKING:
    from streamtasks.signature import Canvas
    from streamtasks.worker.consumer import Worker

P = ParamSpec("P")
R = TypeVar("R")

# How long App.confirm waits on its condition between polls of the producer: its own poll
# serves the delivery reports when no other thread does (50 ms made a parent sending
# children wait ~70 ms median for acknowledgements that take a few; bench/children_confirm.py).
CONFIRM_SLICE_S = 0.002

#: App.publish serves the producer's delivery reports once every this many sends: after
#: every send cost ~1 us more per send (bench/enqueue_ab.py, 22.6 -> 21.3 us median).
POLL_EVERY_SENDS = 32

log = get_logger("streamtasks.app")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One encoded task record, ready to send: where, what, its key and headers."""

    topic: str
    value: bytes
    key: bytes
    headers: dict[str, bytes]


class App:
    """A streamtasks application: where tasks are registered, sent and read back.

    Args:
        name: the application's name (shown in logs).
        broker: a broker URL (``kafka://host:9092``, ``memory://``) or a :class:`Broker`.
        backend: a backend URL (``cassandra://host:9042/keyspace``, ``memory://``) or a
            :class:`ResultBackend`.
        settings: every other setting; when omitted, read from ``STREAMTASKS_*`` env vars
            and ``$STREAMTASKS_CONFIG`` (:meth:`Settings.from_env`), so ``broker`` and
            ``backend`` given here still leave every other variable honoured.
        codec: the message codec (Avro single-object encoding by default).

    Example:
        >>> app = App("demo", broker="memory://", backend="memory://")
        >>> @app.task(name="add")
        ... def add(a: int, b: int) -> int:
        ...     return a + b
    """

    def __init__(
        self,
        name: str = "streamtasks",
        broker: str | Broker | None = None,
        backend: str | ResultBackend | None = None,
        *,
        settings: Settings | None = None,
        codec: Codec | None = None,
    ) -> None:
        self.name = name
        overrides: dict[str, Any] = {
            k: v for k, v in (("broker", broker), ("backend", backend)) if isinstance(v, str)
        }
        if settings is None:
            self.settings = Settings.from_env(**overrides)
        else:
            self.settings = settings.replace(**overrides) if overrides else settings
        ensure_configured(self.settings)
        self.codec: Codec = codec or AvroCodec()
        self.tasks: dict[str, Task[Any, Any]] = {}
        #: App-wide error handlers (:meth:`on_failure`), called in registration order.
        self.failure_handlers: list[ErrorHook] = []
        #: Periodic tasks by schedule name (:meth:`periodic`).
        self.schedules: dict[str, Schedule] = {}
        self._broker = broker if isinstance(broker, Broker) else None
        self._backend = backend if isinstance(backend, ResultBackend) else None
        self._lock = threading.Lock()
        #: Notified when a send is confirmed or failed (:meth:`confirm` waits on it).
        self._delivery = threading.Condition(self._lock)
        #: Threads waiting on ``_delivery`` (a report with none waiting notifies no one).
        self._confirming = 0
        #: Tasks this app published (paces its polls of the producer).
        self._sends = 0
        self._unconfirmed: dict[str, str] = {}
        self._abandoned = False
        self._failed: dict[str, str] = {}
        # Reported by a flush as not confirmed in time, and dropped (see flush).
        self._dropped: set[str] = set()
        self._queues_ready: set[str] = set()
        ref = weakref.ref(self)
        atexit.register(_flush_at_exit, ref)

    @classmethod
    def from_env(
        cls, name: str = "streamtasks", config_file: str | Path | None = None, **overrides: Any
    ) -> App:
        """Build an app from ``STREAMTASKS_*`` env vars, an optional YAML file and overrides.

        Raises:
            ConfigError: a setting is unknown or malformed.
        """
        return cls(name, settings=Settings.from_env(config_file=config_file, **overrides))

    # -- connections -------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        """The broker, connected on first use."""
        if self._broker is None:
            from streamtasks.broker import broker_from_url

            with self._lock:
                if self._broker is None:
                    self._broker = broker_from_url(self.settings.broker, self.settings)
        return self._broker

    @property
    def backend(self) -> ResultBackend:
        """The result backend, connected on first use."""
        if self._backend is None:
            from streamtasks.backend import backend_from_url

            with self._lock:
                if self._backend is None:
                    self._backend = backend_from_url(
                        self.settings.backend, self.settings, self.codec, to_json_text
                    )
        return self._backend

    # -- registry ----------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        bind: Literal[False] = False,
        name: str | None = None,
        queue: str | None = None,
        ordered: bool = False,
        time_limit_s: float | None = None,
        max_retries: int = 0,
        backoff: str = "exponential",
        backoff_s: float = 1.0,
        backoff_max_s: float = 600.0,
        retry_on: tuple[type[BaseException], ...] | None = None,
        track_started: bool = False,
        on_failure: ErrorHook | None = None,
        on_retry: ErrorHook | None = None,
        on_success: SuccessHook | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        pool: str = "thread",
        rate_limit: str | float | None = None,
        group_rate_limit: str | float | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    @overload
    def task(
        self,
        fn: None = None,
        /,
        *,
        bind: Literal[True],
        name: str | None = None,
        queue: str | None = None,
        ordered: bool = False,
        time_limit_s: float | None = None,
        max_retries: int = 0,
        backoff: str = "exponential",
        backoff_s: float = 1.0,
        backoff_max_s: float = 600.0,
        retry_on: tuple[type[BaseException], ...] | None = None,
        track_started: bool = False,
        on_failure: ErrorHook | None = None,
        on_retry: ErrorHook | None = None,
        on_success: SuccessHook | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        pool: str = "thread",
        rate_limit: str | float | None = None,
        group_rate_limit: str | float | None = None,
    ) -> Callable[[Callable[Concatenate[Any, P], R]], Task[P, R]]: ...

    def task(
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        bind: bool = False,
        name: str | None = None,
        queue: str | None = None,
        ordered: bool = False,
        time_limit_s: float | None = None,
        max_retries: int = 0,
        backoff: str = "exponential",
        backoff_s: float = 1.0,
        backoff_max_s: float = 600.0,
        retry_on: tuple[type[BaseException], ...] | None = None,
        track_started: bool = False,
        on_failure: ErrorHook | None = None,
        on_retry: ErrorHook | None = None,
        on_success: SuccessHook | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        pool: str = "thread",
        rate_limit: str | float | None = None,
        group_rate_limit: str | float | None = None,
    ) -> Task[P, R] | Callable[[Callable[..., R]], Task[P, R]]:
        """Register a function as a task (usable bare or with options).

        Args:
            fn: the function, when used bare as ``@app.task``.
            name: the name workers know it by (default ``module.function``).
            queue: its default queue (default: the app's ``default_queue``).
            ordered: run records sharing a key one after another, in order.
            time_limit_s: the older spelling of ``time_limit``.
            max_retries: retries after a failure (0: a failure is final).
            backoff: ``fixed``, ``exponential`` (full jitter) or ``fibonacci``.
            backoff_s: the base delay between attempts.
            backoff_max_s: the longest delay between attempts.
            retry_on: exception types retried (default: any ``Exception``).
            bind: the function gets the task as its first argument (``self``), with
                ``self.request`` and ``self.retry()`` (Celery's ``bind=True``).
            track_started: write STARTED as soon as a run starts (default: only for a
                run still going after the ``track_started_after_ms`` setting).
            on_failure: ``hook(request, exc, traceback)`` after the task failed for good.
            on_retry: ``hook(request, exc, traceback)`` when a retry is scheduled.
            on_success: ``hook(request, result)`` after the task succeeded.
            time_limit: seconds after which an ``async def`` task is cancelled and a
                ``pool="process"`` task's process is killed (the run ends FAILURE with
                ``TimeLimitExceeded``, or is retried by the policy).
            soft_time_limit: seconds after which ``SoftTimeLimitExceeded`` is raised
                inside a ``pool="process"`` task (it may catch it and clean up).
            pool: ``"thread"`` (default) or ``"process"``: a sync task runs in a child
                process of the worker, which a time limit or a revoke can kill.
            rate_limit: at most this many runs started per worker process: ``"100/s"``,
                ``"10/m"``, ``"5/h"`` or a number per second (Celery's ``rate_limit``).
            group_rate_limit: the same for the queue's whole consumer group: divided
                among its current members (``docs/control.md``).

        Raises:
            ConfigError: another task is registered under the same name, a bad
                retry policy, rate, pool or time limit.
        """
        policy = RetryPolicy(max_retries, backoff, backoff_s, backoff_max_s, retry_on)
        if time_limit is not None and time_limit_s is not None:
            raise ConfigError("give time_limit or time_limit_s, not both")
        limit_s = time_limit if time_limit is not None else time_limit_s
        rates = (parse_rate(rate_limit), parse_rate(group_rate_limit, "group_rate_limit"))

        hooks = TaskHooks(on_failure, on_retry, on_success)

        def register(func: Callable[..., R]) -> Task[P, R]:
            task_name = name or f"{func.__module__}.{func.__qualname__}"
            if task_name in self.tasks and self.tasks[task_name].__wrapped__ is not func:
                raise ConfigError(f"a task named {task_name!r} is already registered")
            check_pool(pool, inspect.iscoroutinefunction(func), limit_s, soft_time_limit,
                       f"task {task_name}", bind)
            options = TaskOptions(
                queue=queue or self.settings.default_queue,
                ordered=ordered,
                time_limit_s=limit_s,
                retry=policy,
                bind=bind,
                track_started=track_started,
                hooks=hooks,
                soft_time_limit_s=soft_time_limit,
                pool=pool,
                rate_limit=rates[0],
                group_rate_limit=rates[1],
            )
            registered: Task[P, R] = Task(self, func, task_name, options)
            self.tasks[task_name] = registered
            return registered

        return register(fn) if fn is not None else register

    def on_failure(self, handler: ErrorHook) -> ErrorHook:
        """Register an app-wide error handler (a decorator): called for every task failure.

        ``handler(request, exc, traceback)`` runs in the worker after any task of this
        app failed for good, after the task's own ``on_failure`` hook. A handler that
        raises is logged; it never changes the task's outcome.
        """
        self.failure_handlers.append(handler)
        return handler

    def periodic(
        self,
        cron: str | None = None,
        *,
        tz: str = "UTC",
        every: timedelta | float | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        queue: str | None = None,
        catch_up: str = "latest",
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Run a task periodically: on a cron expression in a time zone, or every period.

        Decorates a function (registered as a task with default options) or a
        :class:`Task`. Any worker fires it (each due time once, see
        ``docs/control.md``); ``streamtasks beat`` runs a scheduler alone.

        Args:
            cron: a five-field cron expression, e.g. ``"*/5 * * * *"``.
            tz: the IANA time zone ``cron`` is read in (default UTC).
            every: the period (a timedelta or seconds), instead of ``cron``.
            args: positional arguments of every firing.
            kwargs: keyword arguments of every firing.
            name: the schedule's name (default: the task's name).
            queue: the queue (default: the task's).
            catch_up: after downtime, ``latest`` (default: the newest missed due time
                fires), ``all`` or ``none``.

        Raises:
            ConfigError: a bad expression, time zone, period or policy, or a schedule of
                that name already exists.
        """

        def register(fn: Callable[P, R]) -> Task[P, R]:
            task = fn if isinstance(fn, Task) else self.task(fn)
            schedule = Schedule(
                name=name or task.name, task=task.name, queue=queue or task.options.queue,
                cron=cron, tz=tz, every_s=every_seconds(every), args=tuple(args),
                kwargs=dict(kwargs or {}), catch_up=catch_up,
            )
            if schedule.name in self.schedules and self.schedules[schedule.name] != schedule:
                raise ConfigError(f"a schedule named {schedule.name!r} is already declared")
            check_arguments(task.fn, list(schedule.args), dict(schedule.kwargs))
            self.schedules[schedule.name] = schedule
            return task

        return register

    # -- sending -----------------------------------------------------------------

    def send(
        self,
        name: str,
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
        _task: Task[Any, Any] | None = None,
        **legacy: Any,
    ) -> AsyncResult[Any]:
        """Send a task by name; return an :class:`AsyncResult` at once.

        The options keep Celery's names (``docs/celery.md``). The send is queued in the
        producer; :meth:`flush` (or ``confirm=True``) waits for Kafka to confirm it.

        Args:
            name: the registered task name (the function need not be imported here).
            args: positional arguments.
            kwargs: keyword arguments.
            queue: the queue (default: the task's, else the app's default queue).
            key: partition key: tasks with one key share a partition (and keep order
                for ``ordered`` tasks). Default: the task id.
            task_id: the id to use (default: a fresh UUID; inside a running task, an id
                derived from the task's id and the send's position, see
                :mod:`streamtasks.context`).
            countdown: run no earlier than this many seconds from now
                (``countdown_s`` is still accepted).
            eta: run no earlier than this time (an aware datetime, or naive UTC).
            expires: not to run after this many seconds from now, or after this
                datetime (naive: UTC); ``expires_s`` is still accepted.
            link: signatures started with this task's result when it succeeds.
            link_error: signatures started with the failure as data (one dict:
                ``task_id``, ``name``, ``args``, ``kwargs``, ``error_type``, ``message``,
                ``traceback``) when it fails for good.
            max_retries: override the task's ``max_retries`` for this call.
            backoff: override the task's backoff (``fixed``, ``exponential``,
                ``fibonacci``).
            backoff_s: override the task's base backoff delay.
            deadline_s: schedule no retry later than this many seconds from now.
            confirm: wait until Kafka confirmed this task.
            **legacy: the older spellings ``countdown_s`` and ``expires_s``; any other
                name is refused with a :class:`ConfigError` naming it.

        Raises:
            ConfigError: an option streamtasks refuses (``priority``, ...) or does not
                know, or ``countdown`` with ``eta``.
            ArgumentError: the arguments do not fit a task registered here.
            EncodeError: an argument has a type that cannot be sent.
            MessageTooLargeError: the task is larger than ``max_message_bytes``.
            SendError: with ``confirm``, Kafka did not confirm it.
        """
        if legacy:
            aliases = take_aliases(f"send {name}", legacy, CALL_OPTIONS)
            countdown = one_of(f"send {name}", "countdown", countdown, aliases)
            expires = one_of(f"send {name}", "expires", expires, aliases)
        task = _task or self.tasks.get(name)
        args = list(args or ())
        kwargs = dict(kwargs or {})
        if task is not None:
            check_arguments(task.fn, args, kwargs)
        now = now_ms()
        msg = TaskMessage(
            # inside a running task: derived from its id (a repeated run re-sends the same)
            id=child_task_id(task_id),
            name=name,
            queue=queue or (task.options.queue if task else self.settings.default_queue),
            # encode_task converts dataclasses / pydantic models and refuses what it cannot
            args=args,
            kwargs=kwargs,
            key=key,
            created_ms=now,
            eta_ms=_eta_ms(now, countdown, eta),
            expires_ms=_expires_ms(now, expires),
            options=call_options(
                max_retries, backoff, backoff_s,
                None if deadline_s is None else now + int(deadline_s * 1000),
            ),
            # inside a task: the task's trace; elsewhere a new one
            traceparent=tracing.traceparent_for_send(),
        )
        link_to_parent(msg)
        msg.link = freeze_callbacks(msg.id, "link", link)
        msg.link_error = freeze_callbacks(msg.id, "link_error", link_error)
        self.publish(msg)
        if confirm:
            self.flush(only=[msg.id])
        return AsyncResult(msg.id, self)

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Send a task by name, as Celery's ``send_task``: :meth:`send` under its name.

        Raises:
            ConfigError: as :meth:`send`.
        """
        return self.send(name, args, kwargs, **options)

    def publish_all(self, messages: Sequence[TaskMessage], confirm: bool = False) -> None:
        """Send the first tasks of a workflow: check them all, then queue them all.

        Raises:
            ArgumentError: a message's arguments do not fit a task registered here
                (nothing is sent).
            EncodeError: a value cannot be encoded.
            SendError: with ``confirm``, Kafka did not confirm every task.
        """
        for msg in messages:
            task = self.tasks.get(msg.name)
            if task is not None:
                check_arguments(task.fn, msg.args, msg.kwargs)
        traceparent = tracing.traceparent_for_send()  # one workflow, one trace
        for msg in messages:
            if msg.traceparent is None:
                msg.traceparent = traceparent
            self.publish(msg)
        if confirm:
            self.flush(only=[msg.id for msg in messages])

    def publish(
        self,
        msg: TaskMessage,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Mapping[str, bytes] | None = None,
    ) -> None:
        """Queue an encoded task record on its queue's topic (no argument checks).

        A task due later (``eta_ms`` in the future) goes to the delay tier that fits.
        ``key`` defaults to the task key, else its id; ``headers`` are added to the task
        headers (operator tools carry ``st-replay-of``, ``dlq-original-*``).

        Raises:
            EncodeError: a value in the message cannot be encoded.
            MessageTooLargeError: the record exceeds ``max_message_bytes``.
        """
        out = self.outgoing(msg, now_ms())
        with self._lock:
            self._unconfirmed[msg.id] = msg.name
        try:
            self.broker.send(
                out.topic,
                out.value,
                key=key if key is not None else out.key,
                headers={**out.headers, **headers} if headers else out.headers,
                partition=partition,
                on_delivery=partial(self._delivered, msg.id),
            )
        except BaseException:
            with self._lock:
                self._unconfirmed.pop(msg.id, None)
            raise
        log.debug("task queued", id=msg.id, name=msg.name, topic=out.topic)
        if self.settings.track_pending:
            self._mark_pending(msg)
        # Serve the delivery reports that came in meanwhile, every few sends (librdkafka's
        # examples poll after each produce): left for the flush, 50,000 sends' callbacks
        # piled up and the garbage collector's full passes over them cost ~2 us a send.
        self._sends += 1  # not exact across threads; only paces the polls
        if self._sends % POLL_EVERY_SENDS == 0:
            self.broker.poll(0)

    def _mark_pending(self, msg: TaskMessage) -> None:
        """Write PENDING for a task just queued (setting ``track_pending``); never fails it.

        The entry never overwrites a later state (see ``ResultBackend.mark_progress``).
        """
        def logged(future: Future[None]) -> None:
            error = future.exception()
            if error is not None:
                log.warning("PENDING row not written", id=msg.id, error=str(error))

        try:
            self.backend.mark_progress(msg.id, states.PENDING, 0, msg.name, msg.queue)\
                .add_done_callback(logged)
        except StreamTasksError as err:
            log.warning("PENDING row not written", id=msg.id, error=str(err))

    def outgoing(self, msg: TaskMessage, now: int) -> Outgoing:
        """Encode a task into the record that sends it now (its queue's topics made ready).

        Raises:
            EncodeError: a value in the message cannot be encoded.
            MessageTooLargeError: the record exceeds ``max_message_bytes``.
        """
        self.ensure_queue(msg.queue)
        value = self.codec.encode_task(msg)
        limit = self.broker.max_message_bytes
        if len(value) > limit:
            raise MessageTooLargeError(
                f"task {msg.name} {msg.id} is {len(value)} bytes encoded, over the limit of "
                f"{limit} bytes (setting max_message_bytes); nothing was sent"
            )
        return Outgoing(self.topic_for(msg, now), value, (msg.key or msg.id).encode(),
                        task_headers(msg))

    def topic_for(self, msg: TaskMessage, now: int) -> str:
        """Return the topic a task goes to now: its queue's, or the delay tier that fits."""
        topology = self.settings.topology
        tier = None if msg.eta_ms is None else next_hop(topology.tiers, msg.eta_ms - now)
        if tier is None:
            return topology.topic(msg.queue)
        return topology.tier_topic(msg.queue, tier)

    def _delivered(self, task_id: str, error: str | None) -> None:
        with self._lock:
            self._unconfirmed.pop(task_id, None)
            if task_id in self._dropped:  # the caller was told already
                self._dropped.discard(task_id)
                if error is None:  # it was in flight: the broker has it after all
                    log.warning("a send reported as not confirmed was confirmed later",
                                id=task_id)
            elif error is not None:
                self._failed[task_id] = error
            if self._confirming:
                self._delivery.notify_all()

    def flush(self, timeout_s: float = 30.0, only: Sequence[str] | None = None) -> None:
        """Wait until every queued send is confirmed by the broker.

        Args:
            timeout_s: how long to wait at most.
            only: report only these task ids (others stay reported for a later flush).

        A task not confirmed in time is reported once and dropped: every record still
        queued for sending is dropped with it (each reported as failed by the flush that
        covers it), so nothing reported is sent later behind the caller's back or waited
        for again at exit. A record already in flight may still land
        (``docs/decisions.md``, "A send not confirmed in time").

        Raises:
            SendError: naming every task that failed or was not confirmed in time.
        """
        self.broker.flush(timeout_s)
        with self._lock:
            ids = list(self._unconfirmed) + list(self._failed) if only is None else only
        self._raise_unconfirmed(ids, timeout_s)

    def confirm(self, task_ids: Sequence[str], timeout_s: float = 300.0) -> None:
        """Wait until the broker confirmed the tasks ``task_ids``, not every queued send.

        A worker waits so for the tasks a run sent before the run counts as done (its
        offset may then advance: a crash after it must not lose them). The default wait
        is the Kafka client's own delivery timeout, after which a send has failed.

        Raises:
            SendError: naming the tasks that failed or were not confirmed in time.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                left = deadline - time.monotonic()
                if left <= 0 or not any(t in self._unconfirmed for t in task_ids):
                    break
                self._confirming += 1
                try:
                    self._delivery.wait(min(left, CONFIRM_SLICE_S))
                finally:
                    self._confirming -= 1
            self.broker.poll(0)  # serve delivery reports here too (no loop may be polling)
        self._raise_unconfirmed(task_ids, timeout_s)

    def _raise_unconfirmed(self, task_ids: Sequence[str], timeout_s: float) -> None:
        with self._lock:
            failures = []
            late = [t for t in task_ids if t not in self._failed and t in self._unconfirmed]
            for tid in task_ids:
                if tid in self._failed:
                    failures.append((tid, self._failed.pop(tid)))
            for tid in late:
                del self._unconfirmed[tid]
                self._dropped.add(tid)
                failures.append(
                    (tid, f"not confirmed within {timeout_s}s; dropped from the send queue"))
        if late:
            self.broker.drop_queued()
            log.warning("sends not confirmed in time dropped", tasks=len(late),
                        timeout_s=timeout_s)
        if failures:
            raise SendError(failures)

    def abandon_unconfirmed(self) -> list[str]:
        """Stop waiting for queued sends (Ctrl-C); return the ids Kafka had not confirmed.

        The app then skips its flush at exit. Those tasks may or may not reach Kafka:
        the caller reports them (e.g. to send them again, which is safe by id).
        """
        with self._lock:
            ids = [*self._unconfirmed, *self._failed]
            self._unconfirmed.clear()
            self._failed.clear()
            self._abandoned = True
        return ids

    def ensure_queue(self, queue: str) -> None:
        """Create the queue's topics (task and dead-letter) once, if allowed."""
        if queue in self._queues_ready or not self.settings.create_topics:
            return
        self.broker.create_topics(self.topic_specs(queue))
        self._queues_ready.add(queue)

    def topic_specs(self, queue: str, partitions: int | None = None) -> list[TopicSpec]:
        """Return the topics a queue needs (see :meth:`Topology.topic_specs`)."""
        return self.settings.topology.topic_specs(queue, partitions)

    # -- results -----------------------------------------------------------------

    def result(self, task_id: str) -> AsyncResult[Any]:
        """Return a handle on the result of any task id."""
        return AsyncResult(task_id, self)

    def group_result(self, group_id: str) -> GroupResult | None:
        """Return a group saved by :meth:`GroupResult.save` (in any process), or None.

        Celery's ``GroupResult.restore(group_id)``.

        Raises:
            BackendError: the backend failed the read.
        """
        return GroupResult.restore(group_id, self)

    def revoke(self, task_ids: str | Sequence[str], *, terminate: bool = False,
               expires_s: float = REVOKE_EXPIRES_S) -> None:
        """Revoke tasks: any not yet started ends REVOKED without running.

        Every worker learns of it within about a second (``docs/control.md``). Revoking
        a workflow's id (a chain's, a group's) revokes its parts not yet run.

        Args:
            task_ids: one id or several.
            terminate: also stop them while running: an ``async def`` task is cancelled,
                a task in a child process (``pool="process"``) is killed.
            expires_s: how long the revoke is kept (default 3 hours).

        Raises:
            ConfigError: no id, or ``expires_s`` not positive.
            BackendError: the backend did not record the revoke.
            SendError: Kafka did not confirm the broadcast.
        """
        from streamtasks.control import revoke

        revoke(self, [task_ids] if isinstance(task_ids, str) else task_ids, terminate,
               expires_s)

    def get_task(self, name: str) -> Task[Any, Any]:
        """Return a registered task.

        Raises:
            UnknownTaskError: no task of that name is registered.
        """
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise UnknownTaskError(
                f"no task named {name!r} is registered (registered: {known})"
            ) from None

    # -- workers -----------------------------------------------------------------

    def worker(self, queues: Sequence[str] | None = None, **options: Any) -> Worker:
        """Return a worker consuming ``queues`` (default: every queue of a task)."""
        from streamtasks.worker.consumer import Worker

        return Worker(self, queues or self.queues(), **options)

    def queues(self) -> list[str]:
        """Return the queues of the registered tasks (the default queue when none)."""
        return sorted({t.options.queue for t in self.tasks.values()}) or [
            self.settings.default_queue
        ]

    def drain(self, queues: Sequence[str] | None = None, timeout_s: float = 10.0) -> None:
        """Run a worker in this thread until every queued task is done (for tests).

        Raises:
            ResultTimeout: the queues were not idle within ``timeout_s``.
            Exception: the first error a task raised (fail fast, as in a unit test).
        """
        self.flush()
        worker = self.worker(queues)
        try:
            worker.run_until_idle(timeout_s)
        finally:
            worker.close()
        if worker.task_errors:
            raise worker.task_errors[0]

    def close(self) -> None:
        """Flush pending sends and release the broker and backend."""
        try:
            if self._broker is not None:
                self.flush()
        finally:
            if self._broker is not None:
                self._broker.close()
            if self._backend is not None:
                self._backend.close()


def _eta_ms(now: int, countdown: float | None, eta: datetime | None) -> int | None:
    if countdown is not None and eta is not None:
        raise ConfigError("give countdown or eta, not both")
    if countdown is not None:
        return now + int(countdown * 1000)
    if eta is not None:
        return epoch_ms(eta)
    return None


def _expires_ms(now: int, expires: float | datetime | None) -> int | None:
    if expires is None:
        return None
    if isinstance(expires, datetime):
        return epoch_ms(expires)
    return now + int(expires * 1000)


def _flush_at_exit(ref: weakref.ReferenceType[App]) -> None:
    app = ref()
    if app is None or app._broker is None or app._abandoned:
        return
    try:
        app.flush()
    except SendError as err:
        log.error("unconfirmed sends at exit", error=str(err))
