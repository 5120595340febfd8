"""The workflow engine: workflows as plain data carried by task messages.

A workflow (built with :mod:`streamtasks.signature`) is frozen into *nodes*: plain
dicts that travel inside :class:`~streamtasks.message.TaskMessage` fields, so a
worker needs nothing but the message to know what follows a task.

Node kinds (key ``kind``):

``task``
    ``id``, ``name``, ``args``, ``kwargs``, ``immutable``, ``options``, ``link``,
    ``link_error``: one task call.
``chain``
    ``steps``: nodes run one after another; only the last step may be a group (a group
    followed by more steps is turned into a chord when the chain is built).
``group``
    ``id``, ``members``: nodes run in parallel.
``chord``
    ``group`` (a group node), ``body`` (the node the results go to), ``link_error``
    (error callbacks when a member fails).
``join``
    ``group``, ``index``, ``size``, ``body``, ``link_error``: the end of a chord
    member: record the result as member ``index``; the member that completes the group
    fires ``body`` with the list of results (decided once in the backend).

A task message's ``chain`` field holds the nodes that follow it (its continuation):
on success the first is launched with the task's result appended to its positional
arguments, and it carries the rest. ``link`` nodes get the result too; ``link_error``
nodes get the failed task's id and error text.

Every id is fixed when the workflow is applied (derived from the workflow's root id),
so a task that runs twice sends follow-ups with the same ids: a repeat overwrites its
children's rows, it never forks the workflow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamtasks.errors import ConfigError
from streamtasks.message import TaskMessage
from streamtasks.retry import call_options

#: A frozen workflow node (see the module docs).
Node = dict[str, Any]

TASK = "task"
CHAIN = "chain"
GROUP = "group"
CHORD = "chord"
JOIN = "join"

#: Option names a task node may carry (see :meth:`Signature.set`).
TASK_OPTIONS = frozenset(
    {"queue", "key", "countdown_s", "expires_s", "max_retries", "backoff", "backoff_s"}
)


def error_text(error: BaseException | str) -> str:
    """Return how an error is handed to an error callback: ``Type: message``."""
    if isinstance(error, str):
        return error
    return f"{type(error).__name__}: {error}"


@dataclass(slots=True)
class Launch:
    """What a finished task sends next.

    Attributes:
        messages: follow-up tasks to send.
        join: the chord join this task ends, or None.
        doomed: task nodes that can no longer run (a failed task's continuation).
    """

    messages: list[TaskMessage] = field(default_factory=list)
    join: Node | None = None
    doomed: list[Node] = field(default_factory=list)


def launch(
    node: Node,
    extra_args: Sequence[Any],
    tail: Sequence[Node],
    parent: TaskMessage | None,
    default_queue: str,
    now_ms: int,
) -> list[TaskMessage]:
    """Turn a node into the task messages that start it.

    Args:
        node: the node to start.
        extra_args: appended to the positional arguments of the node's first tasks
            (a previous step's result), except for immutable tasks.
        tail: the nodes that follow this one (carried as the continuation).
        parent: the task whose success or failure starts the node (None from a producer).
        default_queue: the queue of a task node without a ``queue`` option.
        now_ms: the current time (for countdowns).

    Raises:
        ConfigError: a malformed node.
    """
    kind = node.get("kind")
    if kind == TASK:
        return [_task_message(node, extra_args, tail, parent, default_queue, now_ms)]
    if kind == CHAIN:
        steps = list(node["steps"])
        if not steps:
            raise ConfigError("a chain needs at least one step")
        return launch(steps[0], extra_args, [*steps[1:], *tail], parent, default_queue, now_ms)
    if kind == GROUP:
        if tail:  # a group followed by more steps waits for all members: a chord
            return launch(
                {"kind": CHORD, "group": node, "body": {"kind": CHAIN, "steps": list(tail)},
                 "link_error": []},
                extra_args, [], parent, default_queue, now_ms,
            )
        members = list(node["members"])
        return [
            msg
            for index, member in enumerate(members)
            for msg in _member(member, index, len(members), node["id"], extra_args, [],
                               parent, default_queue, now_ms)
        ]
    if kind == CHORD:
        group, body = node["group"], node["body"]
        if tail:
            body = {"kind": CHAIN, "steps": [body, *tail]}
        members = list(group["members"])
        if not members:
            raise ConfigError("a chord needs at least one member in its group")
        size = len(members)
        messages = []
        for index, member in enumerate(members):
            join = {"kind": JOIN, "group": group["id"], "index": index, "size": size,
                    "body": body, "link_error": list(node.get("link_error") or [])}
            messages += _member(member, index, size, group["id"], extra_args, [join], parent,
                                default_queue, now_ms)
        return messages
    raise ConfigError(f"cannot start a workflow node of kind {kind!r}")


def _member(
    member: Node, index: int, size: int, group_id: str, extra_args: Sequence[Any],
    tail: Sequence[Node], parent: TaskMessage | None, default_queue: str, now_ms: int,
) -> list[TaskMessage]:
    messages = launch(member, extra_args, tail, parent, default_queue, now_ms)
    if member.get("kind") == TASK:
        msg = messages[0]
        msg.group_id, msg.group_index, msg.group_size = group_id, index, size
    return messages


def _task_message(
    node: Node, extra_args: Sequence[Any], tail: Sequence[Node], parent: TaskMessage | None,
    default_queue: str, now_ms: int,
) -> TaskMessage:
    options: Mapping[str, Any] = node.get("options") or {}
    args = list(node.get("args") or [])
    if not node.get("immutable"):
        args += extra_args
    countdown_s = options.get("countdown_s")
    expires_s = options.get("expires_s")
    return TaskMessage(
        id=node["id"],
        name=node["name"],
        queue=options.get("queue") or default_queue,
        args=args,
        kwargs=dict(node.get("kwargs") or {}),
        created_ms=now_ms,
        eta_ms=None if countdown_s is None else now_ms + int(countdown_s * 1000),
        expires_ms=None if expires_s is None else now_ms + int(expires_s * 1000),
        key=options.get("key"),
        parent_id=None if parent is None else parent.id,
        root_id=None if parent is None else parent.root_id or parent.id,
        link=list(node.get("link") or []),
        link_error=list(node.get("link_error") or []),
        chain=list(tail),
        options=call_options(
            options.get("max_retries"), options.get("backoff"), options.get("backoff_s"), None
        ),
        traceparent=None if parent is None else parent.traceparent,
    )


def on_success(msg: TaskMessage, result: Any, default_queue: str, now_ms: int) -> Launch:
    """Return what follows a task that succeeded with ``result``.

    Raises:
        ConfigError: a malformed continuation node.
    """
    plan = Launch()
    if msg.chain:
        head, rest = msg.chain[0], msg.chain[1:]
        if head.get("kind") == JOIN:
            plan.join = head
        else:
            plan.messages += launch(head, [result], rest, msg, default_queue, now_ms)
    for node in msg.link:
        plan.messages += launch(node, [result], [], msg, default_queue, now_ms)
    return plan




def failure_info(
    msg: TaskMessage, error: BaseException | str, traceback: str | None = None
) -> dict[str, Any]:
    """Return the failure handed to an error callback, as data (one dict).

    Keys: ``task_id``, ``name``, ``queue``, ``args``, ``kwargs``, ``attempt``,
    ``error_type``, ``message``, ``traceback`` (None when unknown).
    """
    if isinstance(error, str):
        error_type, message = "ChordError", error
    else:
        error_type, message = type(error).__name__, str(error)
    return {
        "task_id": msg.id, "name": msg.name, "queue": msg.queue, "args": list(msg.args),
        "kwargs": dict(msg.kwargs), "attempt": msg.attempt, "error_type": error_type,
        "message": message, "traceback": traceback,
    }


#: The keys of :func:`failure_info`'s dict (a worker recognises one by them).
_FAILURE_KEYS = frozenset({"task_id", "name", "queue", "args", "kwargs", "attempt",
                           "error_type", "message", "traceback"})


def as_failure_pair(args: Sequence[Any]) -> list[Any] | None:
    """Return ``args`` with their trailing failure dict as the older pair, or None.

    An error callback whose function takes two arguments (and not one) is the form
    before the failure was handed over as a dict: the worker that runs it (the only one
    that surely knows its function) binds it ``(task_id, "Type: message")`` instead.
    None when the last argument is not a :func:`failure_info` dict.
    """
    info = args[-1] if args else None
    if not isinstance(info, dict) or info.keys() != _FAILURE_KEYS:
        return None
    chord_text = info["error_type"] == "ChordError"  # a chord's failure: its text alone
    text = info["message"] if chord_text else f"{info['error_type']}: {info['message']}"
    return [*args[:-1], info["task_id"], text]


def _errbacks(
    nodes: Sequence[Node], msg: TaskMessage, error: BaseException | str,
    traceback: str | None, parent: TaskMessage, default_queue: str, now_ms: int,
) -> list[TaskMessage]:
    info = failure_info(msg, error, traceback)
    return [
        callback
        for node in nodes
        for callback in launch(node, [info], [], parent, default_queue, now_ms)
    ]


def on_failure(
    msg: TaskMessage, error: BaseException | str, default_queue: str, now_ms: int,
    traceback: str | None = None,
) -> list[TaskMessage]:
    """Return the error callbacks of a task that failed for good (or can never run).

    Each gets the failure as one dict appended to its arguments (:func:`failure_info`;
    a two-argument callback is bound to the older pair where it runs,
    :func:`as_failure_pair`).

    Raises:
        ConfigError: a malformed error callback node.
    """
    return _errbacks(msg.link_error, msg, error, traceback, msg, default_queue, now_ms)


def broken_continuation(msg: TaskMessage) -> Launch:
    """Return what a failed task's continuation loses: its tasks, and a chord it ends.

    The caller marks ``doomed`` tasks FAILURE and fails the ``join``'s chord.
    """
    plan = Launch()
    for node in msg.chain:
        if node.get("kind") == JOIN:
            plan.join = node
        else:
            plan.doomed += task_nodes(node)
    return plan


#: Keys of workflow nodes whose string values are task or group ids.
_ID_KEYS = frozenset({"id", "origin", "group"})
#: Keys of workflow nodes holding the caller's data, never walked for ids.
_DATA_KEYS = frozenset({"args", "kwargs", "options"})


def renamed_ids(value: Any, rename: Callable[[str], str]) -> Any:
    """Return a copy of a node (or a list of nodes) with every task and group id renamed.

    Task and group ``id``, a callback copy's ``origin`` and a join's ``group`` (a chord's
    ``group`` is a node, walked like any other) go through ``rename``; one ``rename``
    applied to every message of a workflow keeps its joins and groups pointing at each other.
    Arguments and options are the caller's data and are left as they are.
    """
    if isinstance(value, list):
        return [renamed_ids(item, rename) for item in value]
    if isinstance(value, dict):
        return {
            key: item if key in _DATA_KEYS
            else rename(item) if key in _ID_KEYS and isinstance(item, str)
            else renamed_ids(item, rename)
            for key, item in value.items()
        }
    return value


def task_nodes(node: Node) -> Iterator[Node]:
    """Yield every task node of a workflow node, in order (callbacks not included)."""
    kind = node.get("kind")
    if kind == TASK:
        yield node
    elif kind == CHAIN:
        for step in node["steps"]:
            yield from task_nodes(step)
    elif kind == GROUP:
        for member in node["members"]:
            yield from task_nodes(member)
    elif kind == CHORD:
        yield from task_nodes(node["group"])
        yield from task_nodes(node["body"])
    # a join's body belongs to the chord it ends: the join is not part of this node


def joins_in(node: Node) -> Iterator[Node]:
    """Yield the chord joins a node ends in (a chord that is a member of an outer one)."""
    kind = node.get("kind")
    if kind == JOIN:
        yield node
    elif kind == CHAIN:
        for step in node["steps"]:
            yield from joins_in(step)
    elif kind == CHORD:
        yield from joins_in(node["body"])


def chord_error_callbacks(join: Node, member: TaskMessage) -> list[Node]:
    """Return the error callbacks of a failed chord: its own, then its body's first task's.

    A callback the failed member ran already is left out: one given to a whole chain or
    group (``on_error``) is on every task of it, the member's and the body's alike
    (copies share their ``origin``).
    """
    ran = {node.get("origin") for node in member.link_error} - {None}
    callbacks = list(join.get("link_error") or [])
    first = next(task_nodes(join["body"]), None)
    if first is not None:
        callbacks += [
            node for node in first.get("link_error") or [] if node.get("origin") not in ran
        ]
    return callbacks


def on_chord_failure(
    join: Node, member: TaskMessage, error: BaseException | str, default_queue: str,
    now_ms: int,
) -> list[TaskMessage]:
    """Return the error callbacks of a failed chord (started once, by its claimer).

    They get the failed member's failure as one dict (:func:`failure_info`; the old
    pair for a two-argument callback, :func:`as_failure_pair`); the caller also marks the
    body's tasks
    (:func:`task_nodes`) FAILURE.

    Raises:
        ConfigError: a malformed error callback node.
    """
    return _errbacks(list(chord_error_callbacks(join, member)), member, error, None, member,
                     default_queue, now_ms)


def chord_failure_text(join: Node, member: TaskMessage, error: BaseException | str) -> str:
    """Return the error message written to a failed chord's body rows."""
    return (
        f"chord member {join['index']} of {join['size']} (task {member.id}, {member.name}) "
        f"failed: {error_text(error)}"
    )
