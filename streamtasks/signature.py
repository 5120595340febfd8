"""Signatures and workflows: task calls as data, composed into chains, groups and chords.

Build them with ``task.s(...)`` / ``task.si(...)`` and :func:`chain`, :func:`group`,
:func:`chord`; start them with ``.apply_async()``. The argument-passing rules are in
``docs/workflows.md``:

- chain: each step's result is appended to the next step's positional arguments,
  unless that step is immutable (``.si()``);
- group: members run in parallel; the group's result is the list of their results;
- chord: a group whose results (a list, in group order) go to one callback, fired once.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from streamtasks.context import child_task_id, link_to_parent
from streamtasks.errors import ConfigError
from streamtasks.message import derived_task_id, now_ms
from streamtasks.result import AsyncResult, ChainResult, GroupResult, ResultHandle
from streamtasks.retry import call_options
from streamtasks.task import OPTION_ALIASES, unsupported_option
from streamtasks.timeutil import epoch_ms
from streamtasks.workflow import (
    CHAIN,
    CHORD,
    GROUP,
    TASK,
    TASK_OPTIONS,
    Node,
    launch,
    task_nodes,
)

if TYPE_CHECKING:
    from streamtasks.app import App


class Canvas(ABC):
    """Something that can be started: a signature, a chain, a group or a chord."""

    def freeze(self, root_id: str) -> Node:
        """Return this workflow as a node, with every task id fixed.

        The result's task (a chain's last step, a chord's body, a group itself) takes
        ``root_id``; every other id is derived from ``root_id`` and the part's place in
        a walk of the workflow, so freezing the same workflow twice with one root gives
        the same ids, and no two parts share one.

        Raises:
            ConfigError: the workflow cannot be built (an empty group, a group as a
                group member, ...).
        """
        return self._freeze(Ids(root_id), result=True)

    @abstractmethod
    def _freeze(self, ids: Ids, result: bool) -> Node:
        """Freeze into a node; ``result``: this part's result task takes the root id."""

    @abstractmethod
    def find_app(self) -> App | None:
        """Return the app of the first signature made from a registered task."""

    def __or__(self, other: Canvas) -> Chain:
        """``a | b`` is ``chain(a, b)``."""
        return Chain((self, _check_part(other, "the right side of |")))

    def apply_async(
        self,
        args: Sequence[Any] = (),
        *,
        app: App | None = None,
        task_id: str | None = None,
        confirm: bool = False,
    ) -> ResultHandle:
        """Send the workflow's first tasks; return a handle on its result.

        Args:
            args: appended to the positional arguments of the first tasks (unless
                immutable).
            app: the app to send with (default: the app of the first registered task).
            task_id: the workflow's root id; the id of its result (a task's id, a
                chain's last step, a group's id, a chord's callback). Default: fresh.
            confirm: wait until Kafka confirmed every first task.

        Raises:
            ConfigError: no app is known, or the workflow is malformed.
            ArgumentError: a first task's arguments do not fit its function.
            EncodeError: a value cannot be sent.
        """
        root = child_task_id(task_id)  # inside a running task: derived from its id
        node = self.freeze(root)
        app = app or self.find_app()
        if app is None:
            raise ConfigError(
                "no app to send this workflow with: build it from registered tasks "
                "(task.s(...)) or pass app= to apply_async"
            )
        messages = launch(node, list(args), [], None, app.settings.default_queue, now_ms())
        for msg in messages:
            link_to_parent(msg)  # inside a running task: its id and root
            msg.root_id = msg.root_id or root
        app.publish_all(messages, confirm=confirm)
        return result_of(node, app)

    def delay(self, *args: Any) -> ResultHandle:
        """Send the workflow with ``args`` appended to its first tasks' arguments."""
        return self.apply_async(args)


@dataclass(frozen=True)
class Signature(Canvas):
    """One task call described as data: a name, arguments and options.

    Make one with ``task.s(*args, **kwargs)`` (its result may be appended to by a
    previous chain step) or ``task.si(...)`` (immutable: never appended to).

    Attributes:
        name: the registered task name.
        args: positional arguments.
        kwargs: keyword arguments.
        immutable: never receives a previous step's result.
        options: ``queue``, ``key``, ``countdown_s``, ``expires_s``, ``eta``,
            ``expires_at``, ``max_retries``, ``backoff``, ``backoff_s``, as stored
            (:meth:`set` takes Celery's names and stores them so).
        link: callbacks started with this task's result when it succeeds.
        link_error: callbacks started with the failure (a dict, see
            :func:`streamtasks.workflow.failure_info`) when it fails
            for good.
        task_id: a fixed id, else one is derived when the workflow is applied.
        app: the app of the task it was made from, if any.
    """

    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    immutable: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    link: tuple[Canvas, ...] = ()
    link_error: tuple[Canvas, ...] = ()
    task_id: str | None = None
    app: App | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _stored_options(self.name, self.options))
        _check_options(self.name, self.options)
        for callback in (*self.link, *self.link_error):
            _check_part(callback, f"a callback of {self.name}")

    def set(self, **options: Any) -> Signature:
        """Return a copy with options set, under Celery's names (None removes one).

        Options: ``queue``, ``key``, ``countdown`` (seconds), ``eta`` (datetime, naive:
        UTC), ``expires`` (seconds or datetime), ``task_id``, ``link`` / ``link_error``
        (a signature or a list: as :meth:`on_success` / :meth:`on_error`),
        ``max_retries``, ``backoff``, ``backoff_s``. ``countdown_s`` and ``expires_s``
        are still accepted. A datetime in a workflow step counts from when the workflow
        is sent.

        Raises:
            ConfigError: an option streamtasks refuses (``priority``, ...) or does not
                know (the message names it), or a malformed value.
        """
        sig = self
        rest = dict(options)
        for callback in _as_list(rest.pop("link", None)):
            sig = sig.on_success(callback)
        for callback in _as_list(rest.pop("link_error", None)):
            sig = sig.on_error(callback)
        if "task_id" in rest:
            sig = dataclasses.replace(sig, task_id=rest.pop("task_id"))
        changes = _stored_options(self.name, rest)
        if "expires" in rest or "expires_s" in rest:  # one expiry, whichever form
            changes.setdefault("expires_s", None)
            changes.setdefault("expires_at", None)
        merged = {**sig.options, **changes}
        return dataclasses.replace(
            sig, options={k: v for k, v in merged.items() if v is not None}
        )

    def on_success(self, callback: Canvas) -> Signature:
        """Return a copy that starts ``callback`` with this task's result on success."""
        return dataclasses.replace(self, link=(*self.link, _check_part(callback, "on_success")))

    def on_error(self, callback: Canvas) -> Signature:
        """Return a copy that starts ``callback`` with the failure (a dict) on failure."""
        return dataclasses.replace(
            self, link_error=(*self.link_error, _check_part(callback, "on_error"))
        )

    def with_id(self, task_id: str) -> Signature:
        """Return a copy with a fixed task id."""
        return dataclasses.replace(self, task_id=task_id)

    def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        app: App | None = None,
        task_id: str | None = None,
        confirm: bool = False,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Send this task; ``args`` are appended (unless immutable), ``kwargs`` merged.

        ``options`` are those of :meth:`set` (Celery's names: ``countdown``, ``eta``,
        ``expires``, ``link``, ``link_error``, ``queue``, ...). See
        :meth:`Canvas.apply_async` for the other arguments.

        Raises:
            ConfigError: an option streamtasks refuses or does not know.
        """
        sig = self.set(**options) if options else self
        sig = dataclasses.replace(sig, kwargs={**sig.kwargs, **kwargs}) if kwargs else sig
        result = Canvas.apply_async(sig, args, app=app, task_id=task_id or sig.task_id,
                                    confirm=confirm)
        if not isinstance(result, AsyncResult):  # pragma: no cover - a task node's result
            raise TypeError(f"expected a task's result, got {result!r}")
        return result

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """Send this task with ``args`` appended (unless immutable) and ``kwargs`` merged."""
        return self.apply_async(args, kwargs)

    def _freeze(self, ids: Ids, result: bool) -> Node:
        return {
            "kind": TASK,
            "id": self.task_id or ids.take(result),
            "name": self.name,
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "immutable": self.immutable,
            "options": _wire_options(self.options, now_ms()),
            "link": [c._freeze(ids, False) for c in self.link],
            "link_error": [c._freeze(ids, False) for c in self.link_error],
        }

    def find_app(self) -> App | None:
        """Return the app of the task this signature was made from."""
        return self.app


class Chain(Canvas):
    """Steps run one after another; each result goes to the next step.

    A group inside a chain waits for all its members before the next step starts
    (it becomes a chord whose callback is the rest of the chain).
    """

    def __init__(self, steps: Iterable[Canvas], link_error: Sequence[Canvas] = ()) -> None:
        flat: list[Canvas] = []
        for i, step in enumerate(steps):
            _check_part(step, f"chain step {i}")
            if isinstance(step, Chain) and not step.link_error:
                flat += step.steps
            else:
                flat.append(step)
        if not flat:
            raise ConfigError("a chain needs at least one step")
        self.steps: list[Canvas] = flat
        self.link_error: tuple[Canvas, ...] = tuple(
            _check_part(c, "on_error") for c in link_error
        )

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.steps))})"

    def on_error(self, callback: Canvas) -> Chain:
        """Return a copy whose every task starts ``callback`` when it fails for good."""
        return Chain(self.steps, (*self.link_error, callback))

    def _freeze(self, ids: Ids, result: bool) -> Node:
        node = _chain_node(self.steps, ids, result)
        _add_error_callbacks(node, self.link_error, ids)
        return node

    def find_app(self) -> App | None:
        """Return the app of the first step that knows one."""
        return _first_app(self.steps)


class Group(Canvas):
    """Members run in parallel; the result is the list of their results, in order."""

    def __init__(self, members: Iterable[Canvas], link_error: Sequence[Canvas] = ()) -> None:
        self.members: list[Canvas] = [
            _check_part(m, f"group member {i}") for i, m in enumerate(members)
        ]
        self.link_error: tuple[Canvas, ...] = tuple(
            _check_part(c, "on_error") for c in link_error
        )

    def __repr__(self) -> str:
        return f"group({len(self.members)} members)"

    def __len__(self) -> int:
        return len(self.members)

    def on_error(self, callback: Canvas) -> Group:
        """Return a copy whose every task starts ``callback`` when it fails for good."""
        return Group(self.members, (*self.link_error, callback))

    def _freeze(self, ids: Ids, result: bool) -> Node:
        if not self.members:
            raise ConfigError("a group needs at least one member")
        group_id = ids.take(result)
        members = []
        for i, member in enumerate(self.members):
            node = member._freeze(ids, False)
            if _ends_in_group(node):
                raise ConfigError(
                    f"group member {i} is (or ends in) a group; a member's result must be one "
                    "task's: use a chord, or put the tasks in the outer group"
                )
            members.append(node)
        node = {"kind": GROUP, "id": group_id, "members": members}
        _add_error_callbacks(node, self.link_error, ids)
        return node

    def find_app(self) -> App | None:
        """Return the app of the first member that knows one."""
        return _first_app(self.members)


class Chord(Canvas):
    """A group whose results, as one list in group order, go to a callback (the body).

    The body runs exactly once, when every member succeeded. A member that fails for
    good fails the chord instead: the body's row becomes FAILURE with that member's
    error, and the error callbacks (:meth:`on_error`, then the body's own) run once.
    """

    def __init__(self, header: Group, body: Canvas, link_error: Sequence[Canvas] = ()) -> None:
        if not isinstance(header, Group):
            raise ConfigError(
                f"a chord's header must be a group (or a list of signatures), got "
                f"{type(header).__name__}"
            )
        self.header = header
        self.body = _check_part(body, "a chord's body")
        self.link_error: tuple[Canvas, ...] = tuple(
            _check_part(c, "on_error") for c in link_error
        )

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def on_error(self, callback: Canvas) -> Chord:
        """Return a copy that starts ``callback`` with ``(member_id, error)`` on failure."""
        return Chord(self.header, self.body, (*self.link_error, callback))

    def _freeze(self, ids: Ids, result: bool) -> Node:
        return _chord_node(self.header, self.body._freeze(ids, result), self.link_error, ids)

    def find_app(self) -> App | None:
        """Return the app of the first member or the body."""
        return _first_app([*self.header.members, self.body])


def chain(*steps: Canvas) -> Chain:
    """Return a chain of ``steps``: each result is appended to the next step's arguments."""
    return Chain(steps)


def group(*members: Canvas | Iterable[Canvas]) -> Group:
    """Return a group: ``group(a.s(1), b.s(2))`` or ``group(sigs)`` with an iterable."""
    if len(members) == 1 and not isinstance(members[0], Canvas):
        return Group(members[0])
    return Group(_check_part(m, f"group member {i}") for i, m in enumerate(members))


def chord(header: Group | Iterable[Canvas], body: Canvas) -> Chord:
    """Return a chord: ``body`` gets the list of the header's results once all succeed."""
    if isinstance(header, Group):
        return Chord(header, body)
    if isinstance(header, Canvas) or not isinstance(header, Iterable):
        raise ConfigError(
            f"a chord's header must be a group or a list of signatures, got "
            f"{type(header).__name__}"
        )
    return Chord(Group(header), body)


def result_of(node: Node, app: App) -> ResultHandle:
    """Return the handle on a frozen node's result."""
    kind = node["kind"]
    if kind == TASK:
        return AsyncResult(node["id"], app)
    if kind == GROUP:
        return GroupResult(node["id"], [result_of(m, app) for m in node["members"]], app)
    if kind == CHORD:
        body = result_of(node["body"], app)
        # a body that is a chord already has its group as parent: this one comes before
        last: ResultHandle = body
        while last.parent is not None:
            last = last.parent
        last.parent = result_of(node["group"], app)
        return body
    if kind == CHAIN:
        steps: list[ResultHandle] = []
        for step in node["steps"]:
            while step["kind"] == CHORD:
                steps.append(result_of(step["group"], app))
                step = step["body"]
            handle = result_of(step, app)
            steps += handle.steps if isinstance(handle, ChainResult) else [handle]
        return ChainResult(steps)
    raise ConfigError(f"no result for a workflow node of kind {kind!r}")


# -- freezing helpers -------------------------------------------------------------

#: Options a signature stores: the workflow's own and two datetimes kept until sent.
_STORED_OPTIONS = TASK_OPTIONS | {"eta", "expires_at"}

#: What :meth:`Signature.set` takes, under the names documented for it.
_SET_OPTIONS = (
    "queue", "key", "countdown", "eta", "expires", "task_id", "link", "link_error",
    "max_retries", "backoff", "backoff_s",
)


def freeze_callbacks(
    task_id: str, option: str, callbacks: Canvas | Sequence[Canvas] | None
) -> list[Node]:
    """Freeze ``link`` / ``link_error`` callbacks of a task sent alone (``App.send``).

    Their ids derive from ``task_id``, so sending the same task id twice sends the same
    callbacks.

    Raises:
        ConfigError: a callback is not a signature or workflow.
    """
    if callbacks is None:
        return []  # the common call: nothing to freeze
    ids = Ids(task_id)
    return [_check_part(c, option)._freeze(ids, False) for c in _as_list(callbacks)]


def _as_list(callbacks: Canvas | Sequence[Canvas] | None) -> list[Canvas]:
    if callbacks is None:
        return []
    if isinstance(callbacks, Canvas):
        return [callbacks]
    if isinstance(callbacks, list | tuple):
        return list(callbacks)
    return [_check_part(callbacks, "a callback")]  # refused, its type named


def _stored_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Return options under the names a signature stores (Celery's names translated).

    Raises:
        ConfigError: an option streamtasks refuses or does not know.
    """
    stored: dict[str, Any] = {}
    for option, value in options.items():
        if option in OPTION_ALIASES:
            option = OPTION_ALIASES[option]
        if option == "countdown":
            stored["countdown_s"] = value
        elif option == "expires":
            key = "expires_at" if isinstance(value, datetime) else "expires_s"
            stored[key] = value
        elif option in _STORED_OPTIONS:
            stored[option] = value
        else:
            raise unsupported_option(name, option, _SET_OPTIONS, kind="signature ")
    return stored


def _wire_options(options: Mapping[str, Any], now: int) -> dict[str, Any]:
    """Return options as a workflow node carries them: datetimes as seconds from now."""
    wire = {k: v for k, v in options.items() if k not in ("eta", "expires_at")}
    eta, expires_at = options.get("eta"), options.get("expires_at")
    if eta is not None:
        wire["countdown_s"] = max(0.0, (epoch_ms(eta) - now) / 1000)
    if expires_at is not None:
        wire["expires_s"] = max(0.0, (epoch_ms(expires_at) - now) / 1000)
    return wire


def _check_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse unknown options and values a worker could not use, when the workflow is built.

    Raises:
        ConfigError: naming the option and what was wrong.
    """
    unknown = set(options) - _STORED_OPTIONS
    if unknown:
        raise ConfigError(
            f"unknown signature option(s) {', '.join(sorted(unknown))} for {name}; "
            f"known: {', '.join(sorted(_SET_OPTIONS))}"
        )
    for option in ("eta", "expires_at"):
        value = options.get(option)
        if value is not None and not isinstance(value, datetime):
            raise ConfigError(f"{name}: option {option} must be a datetime, got {value!r}")
    if options.get("countdown_s") is not None and options.get("eta") is not None:
        raise ConfigError(f"{name}: give countdown or eta, not both")
    for option in ("queue", "key"):
        value = options.get(option)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{name}: option {option} must be a non-empty str, got {value!r}")
    for option in ("countdown_s", "expires_s", "backoff_s"):
        value = options.get(option)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value < 0
        ):
            raise ConfigError(
                f"{name}: option {option} must be a number of seconds >= 0, got {value!r}"
            )
    retries = options.get("max_retries")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                or retries < 0):
        raise ConfigError(f"{name}: option max_retries must be an int >= 0, got {retries!r}")
    call_options(None, options.get("backoff"), None, None)  # an unknown backoff


def _check_part(part: object, where: str) -> Canvas:
    """Return ``part`` if it is a signature or workflow, else refuse it clearly.

    Raises:
        ConfigError: naming what was given instead.
    """
    if isinstance(part, Canvas):
        return part
    hint = " (use task.s(...) or task.si(...))" if hasattr(part, "fn") else ""
    raise ConfigError(
        f"{where} must be a signature, chain, group or chord, got {type(part).__name__}"
        f"{hint}"
    )


class Ids:
    """Hands out a workflow's task ids: the root id once, then ids derived from it.

    Derived ids are numbered in the order of a walk of the workflow, which is fixed by
    its structure: the same workflow with the same root always gets the same ids.
    """

    def __init__(self, root_id: str) -> None:
        self.root_id = root_id
        self._taken = 0

    def take(self, result: bool) -> str:
        """Return the root id for the workflow's result task, else the next derived id."""
        if result:
            return self.root_id
        self._taken += 1
        return derived_task_id(self.root_id, f"part-{self._taken}")


def _chain_node(steps: Sequence[Canvas], ids: Ids, result: bool) -> Node:
    """Freeze chain steps; a group or chord before the last step takes the rest as body.

    The last step carries the chain's result, so a chain's result id is its last task's.
    """
    frozen: list[Node] = []
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        if not last and isinstance(step, Group | Chord):
            rest = steps[i + 1:]
            header = step if isinstance(step, Group) else step.header
            body = rest if isinstance(step, Group) else [step.body, *rest]
            errors = step.link_error if isinstance(step, Chord) else ()
            group_node = header._freeze(ids, False)
            frozen.append(_chord_node(group_node, _chain_node(body, ids, result), errors, ids))
            break
        frozen.append(step._freeze(ids, result and last))
    return {"kind": CHAIN, "steps": frozen}


def _chord_node(
    header: Group | Node, body: Node, link_error: Sequence[Canvas], ids: Ids
) -> Node:
    """Assemble a chord node from its header (frozen here unless given so) and body."""
    return {
        "kind": CHORD,
        "group": header if isinstance(header, dict) else header._freeze(ids, False),
        "body": body,
        "link_error": [c._freeze(ids, False) for c in link_error],
    }


def _add_error_callbacks(node: Node, callbacks: Sequence[Canvas], ids: Ids) -> None:
    """Give every task of ``node`` the error callbacks, with ids of their own.

    Each failed task of a group starts its own callback; in a chain only one can fail.
    The copies share an ``origin``, so a chord's failure does not run again the copy its
    failed member ran (see :func:`~streamtasks.workflow.chord_error_callbacks`).
    """
    origins = [ids.take(False) for _ in callbacks]
    for task in list(task_nodes(node)):
        copies = [{**c._freeze(ids, False), "origin": origin}
                  for c, origin in zip(callbacks, origins, strict=True)]
        task["link_error"] = [*task["link_error"], *copies]


def _ends_in_group(node: Node) -> bool:
    if node["kind"] == GROUP:
        return True
    if node["kind"] == CHAIN:
        return _ends_in_group(node["steps"][-1])
    if node["kind"] == CHORD:
        return _ends_in_group(node["body"])
    return False


def _first_app(parts: Iterable[Canvas]) -> App | None:
    for part in parts:
        app = part.find_app()
        if app is not None:
            return app
    return None
