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
from typing import TYPE_CHECKING, Any

from streamtasks.errors import ConfigError
from streamtasks.message import derived_task_id, new_task_id, now_ms
from streamtasks.result import AsyncResult, ChainResult, GroupResult, ResultHandle
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

    @abstractmethod
    def freeze(self, root_id: str, path: str = "") -> Node:
        """Return this workflow as a node, with every task id fixed.

        Ids are derived from ``root_id`` and each part's position (``path``), so the same
        workflow frozen twice with one root gets the same ids.

        Raises:
            ConfigError: the workflow cannot be built (an empty group, a group as a
                group member, ...).
        """

    @abstractmethod
    def find_app(self) -> App | None:
        """Return the app of the first signature made from a registered task."""

    def __or__(self, other: Canvas) -> Chain:
        """``a | b`` is ``chain(a, b)``."""
        return Chain((self, other))

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
        app = app or self.find_app()
        if app is None:
            raise ConfigError(
                "no app to send this workflow with: build it from registered tasks "
                "(task.s(...)) or pass app= to apply_async"
            )
        root = task_id or new_task_id()
        node = self.freeze(root)
        messages = launch(node, list(args), [], None, app.settings.default_queue, now_ms())
        for msg in messages:
            msg.root_id = root
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
        options: ``queue``, ``key``, ``countdown_s``, ``expires_s``, ``max_retries``,
            ``backoff``, ``backoff_s`` (see :meth:`set`).
        link: callbacks started with this task's result when it succeeds.
        link_error: callbacks started with ``(task_id, "Type: message")`` when it fails
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
        unknown = set(self.options) - TASK_OPTIONS
        if unknown:
            raise ConfigError(
                f"unknown signature option(s) {', '.join(sorted(unknown))} for {self.name}; "
                f"known: {', '.join(sorted(TASK_OPTIONS))}"
            )

    def set(self, **options: Any) -> Signature:
        """Return a copy with options set (None removes one).

        Raises:
            ConfigError: an unknown option.
        """
        merged = {**self.options, **options}
        return dataclasses.replace(
            self, options={k: v for k, v in merged.items() if v is not None}
        )

    def on_success(self, callback: Canvas) -> Signature:
        """Return a copy that starts ``callback`` with this task's result on success."""
        return dataclasses.replace(self, link=(*self.link, callback))

    def on_error(self, callback: Canvas) -> Signature:
        """Return a copy that starts ``callback`` with ``(task_id, error)`` on failure."""
        return dataclasses.replace(self, link_error=(*self.link_error, callback))

    def with_id(self, task_id: str) -> Signature:
        """Return a copy with a fixed task id."""
        return dataclasses.replace(self, task_id=task_id)

    def apply_async(
        self,
        args: Sequence[Any] = (),
        *,
        app: App | None = None,
        task_id: str | None = None,
        confirm: bool = False,
    ) -> AsyncResult:
        """Send this task (``args`` appended unless immutable); see :meth:`Canvas.apply_async`."""
        result = super().apply_async(args, app=app, task_id=task_id or self.task_id,
                                     confirm=confirm)
        if not isinstance(result, AsyncResult):  # pragma: no cover - a task node's result
            raise TypeError(f"expected a task's result, got {result!r}")
        return result

    def delay(self, *args: Any) -> AsyncResult:
        """Send this task with ``args`` appended to its arguments (unless immutable)."""
        return self.apply_async(args)

    def freeze(self, root_id: str, path: str = "") -> Node:
        """Return the task node (see :meth:`Canvas.freeze`)."""
        return {
            "kind": TASK,
            "id": self.task_id or _node_id(root_id, path),
            "name": self.name,
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "immutable": self.immutable,
            "options": dict(self.options),
            "link": [c.freeze(root_id, f"{path}/l{i}") for i, c in enumerate(self.link)],
            "link_error": [
                c.freeze(root_id, f"{path}/e{i}") for i, c in enumerate(self.link_error)
            ],
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
        for step in steps:
            if isinstance(step, Chain) and not step.link_error:
                flat += step.steps
            else:
                flat.append(step)
        if not flat:
            raise ConfigError("a chain needs at least one step")
        self.steps: list[Canvas] = flat
        self.link_error: tuple[Canvas, ...] = tuple(link_error)

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.steps))})"

    def on_error(self, callback: Canvas) -> Chain:
        """Return a copy whose every task starts ``callback`` when it fails for good."""
        return Chain(self.steps, (*self.link_error, callback))

    def freeze(self, root_id: str, path: str = "") -> Node:
        """Return the chain node (see :meth:`Canvas.freeze`)."""
        node = _chain_node(self.steps, root_id, path)
        _add_error_callbacks(node, self.link_error, root_id, path)
        return node

    def find_app(self) -> App | None:
        """Return the app of the first step that knows one."""
        return _first_app(self.steps)


class Group(Canvas):
    """Members run in parallel; the result is the list of their results, in order."""

    def __init__(self, members: Iterable[Canvas], link_error: Sequence[Canvas] = ()) -> None:
        self.members: list[Canvas] = list(members)
        self.link_error: tuple[Canvas, ...] = tuple(link_error)

    def __repr__(self) -> str:
        return f"group({len(self.members)} members)"

    def __len__(self) -> int:
        return len(self.members)

    def on_error(self, callback: Canvas) -> Group:
        """Return a copy whose every task starts ``callback`` when it fails for good."""
        return Group(self.members, (*self.link_error, callback))

    def freeze(self, root_id: str, path: str = "") -> Node:
        """Return the group node (see :meth:`Canvas.freeze`)."""
        if not self.members:
            raise ConfigError("a group needs at least one member")
        members = []
        for i, member in enumerate(self.members):
            node = member.freeze(root_id, f"{path}/m{i}")
            if _ends_in_group(node):
                raise ConfigError(
                    f"group member {i} is (or ends in) a group; a member's result must be one "
                    "task's: use a chord, or put the tasks in the outer group"
                )
            members.append(node)
        node = {"kind": GROUP, "id": _node_id(root_id, path), "members": members}
        _add_error_callbacks(node, self.link_error, root_id, path)
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
        self.header = header
        self.body = body
        self.link_error: tuple[Canvas, ...] = tuple(link_error)

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def on_error(self, callback: Canvas) -> Chord:
        """Return a copy that starts ``callback`` with ``(member_id, error)`` on failure."""
        return Chord(self.header, self.body, (*self.link_error, callback))

    def freeze(self, root_id: str, path: str = "") -> Node:
        """Return the chord node (see :meth:`Canvas.freeze`); the body's id is the chord's."""
        return _chord_node(self.header, self.body, self.link_error, root_id, path)

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
    return Group(m for m in members if isinstance(m, Canvas))


def chord(header: Group | Iterable[Canvas], body: Canvas) -> Chord:
    """Return a chord: ``body`` gets the list of the header's results once all succeed."""
    return Chord(header if isinstance(header, Group) else Group(header), body)


def result_of(node: Node, app: App) -> ResultHandle:
    """Return the handle on a frozen node's result."""
    kind = node["kind"]
    if kind == TASK:
        return AsyncResult(node["id"], app)
    if kind == GROUP:
        return GroupResult(node["id"], [result_of(m, app) for m in node["members"]], app)
    if kind == CHORD:
        body = result_of(node["body"], app)
        body.parent = result_of(node["group"], app)
        return body
    if kind == CHAIN:
        steps: list[ResultHandle] = []
        for step in node["steps"]:
            if step["kind"] == CHORD:
                steps.append(result_of(step["group"], app))
                step = step["body"]
            handle = result_of(step, app)
            steps += handle.steps if isinstance(handle, ChainResult) else [handle]
        return ChainResult(steps)
    raise ConfigError(f"no result for a workflow node of kind {kind!r}")


# -- freezing helpers -------------------------------------------------------------


def _node_id(root_id: str, path: str) -> str:
    """The root id itself at the top, else an id derived from the root and the path."""
    return root_id if not path else derived_task_id(root_id, path)


def _chain_node(steps: Sequence[Canvas], root_id: str, path: str) -> Node:
    """Freeze chain steps; a group or chord before the last step takes the rest as body.

    The last step takes the chain's own path, so a chain's result id is its last task's.
    """
    frozen: list[Node] = []
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        step_path = path if last else f"{path}/s{i}"
        if not last and isinstance(step, Group | Chord):
            rest = steps[i + 1:]
            if isinstance(step, Group):
                chord_node = _chord_node(step, Chain(rest), (), root_id, path, step_path)
            else:
                chord_node = _chord_node(step.header, Chain([step.body, *rest]),
                                         step.link_error, root_id, path, step_path)
            frozen.append(chord_node)
            break
        frozen.append(step.freeze(root_id, step_path))
    return {"kind": CHAIN, "steps": frozen}


def _chord_node(
    header: Group, body: Canvas, link_error: Sequence[Canvas], root_id: str, path: str,
    header_path: str | None = None,
) -> Node:
    """Freeze a chord: the body at ``path`` (a chord's result id is its body's)."""
    header_path = f"{header_path if header_path is not None else path}/h"
    return {
        "kind": CHORD,
        "group": header.freeze(root_id, header_path),
        "body": body.freeze(root_id, path),
        "link_error": [
            c.freeze(root_id, f"{header_path}/e{i}") for i, c in enumerate(link_error)
        ],
    }


def _add_error_callbacks(
    node: Node, callbacks: Sequence[Canvas], root_id: str, path: str
) -> None:
    """Give every task of ``node`` the same error callbacks (ids fixed once)."""
    if not callbacks:
        return
    frozen = [c.freeze(root_id, f"{path}/e{i}") for i, c in enumerate(callbacks)]
    for task in task_nodes(node):
        task["link_error"] = [*task["link_error"], *frozen]


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
