"""What follows a finished task in a workflow, as durable effect steps.

The worker appends these steps after a task's own row: the record's offset is
committed only once its follow-ups are confirmed, so a crash repeats them (with the
same task ids), never loses them.

Chords: each member records its result in the backend (:meth:`join_group`); the
members that see the group complete race for its trigger row (:meth:`claim_group`, a
lightweight transaction). A claimer wins only the outcome it claimed (``fired`` or
``failed``): whoever claims second defers to the recorded decision. The holder sends
the decision's messages and then *settles* the trigger row; a member that finds the
row settled does nothing more. The claimer is the member's *record* (topic, partition,
offset): the same record delivered again after a crash carries out its unsettled
decision again, and so, after :data:`CLAIM_PATIENCE_S`, does any member that completes
the chord (the claimer's record may come back only as another attempt). Body ids are
fixed, so a repeat sends a duplicate record, which the body's worker skips once the
body's row is final (see :data:`CHORD_BODY`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamtasks import states
from streamtasks.backend.base import GROUP_FAILED, GROUP_FIRED, GroupClaim, TaskMeta
from streamtasks.broker.base import Record
from streamtasks.errors import BackendError, TaskExpired, TaskRevoked, WorkflowError
from streamtasks.fanin import FanIn
from streamtasks.logs import get_logger
from streamtasks.message import TaskMessage, now_ms
from streamtasks.worker.effects import Step, StepDone, send_all_step, store_all_step
from streamtasks.worker.outcomes import FOLLOW_UP_ERRORS
from streamtasks.workflow import (
    Node,
    broken_continuation,
    chord_failure_text,
    error_text,
    joins_in,
    launch,
    on_chord_failure,
    on_failure,
    on_success,
    task_nodes,
)

if TYPE_CHECKING:
    from streamtasks.app import App, Outgoing

log = get_logger("streamtasks.worker")

#: Errors that make follow-ups impossible to send (retrying gives the same).


#: Option set on the messages of a chord's body: the group whose decision sent them. A
#: worker skips such a task when its row is already final (a duplicate body record).
CHORD_BODY = "chord_body"
#: Seconds a chord decision may stay unconfirmed before another member carries it out.
CLAIM_PATIENCE_S = 10.0


class ChordPending(BackendError):
    """Another member decided the chord a moment ago and has not confirmed it yet.

    Retried like an infrastructure error: the member waits for the decision. An expected
    wait, logged at debug level only.
    """

    expected_wait = True


@dataclass(slots=True)
class _Plan:
    """What a chord decision sends, and the trigger rows to settle once it is confirmed."""

    records: list[Outgoing]
    settle: list[str]


def claimer_of(record: Record) -> str:
    """Return the identity of a record, as a chord trigger's claimer."""
    return f"{record.topic}/{record.partition}@{record.offset}"


class FollowUps:
    """Builds the effect steps that start what follows a task.

    Args:
        app: the app (its broker, backend and codec).
        worker: this worker's name, written in the rows it marks FAILURE.
    """

    def __init__(self, app: App, worker: str) -> None:
        self.app = app
        self.worker = worker
        self._default_queue = app.settings.default_queue
        #: See :data:`CLAIM_PATIENCE_S`.
        self.claim_patience_s = CLAIM_PATIENCE_S
        # chord bookkeeping waits on Cassandra round trips: never on the consumer thread
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="streamtasks-chord")

    def close(self) -> None:
        """Stop the chord bookkeeping threads (steps not yet started are dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def after_success(self, msg: TaskMessage, result: Any, claimer: str) -> list[Step]:
        """Return the steps that start a succeeded task's continuation and callbacks.

        Raises:
            ConfigError: a malformed workflow node in the message (WorkflowError for
                anything unexpected while building the follow-ups).
            EncodeError: the result cannot be passed on.
            MessageTooLargeError: a follow-up task would be too large to send.
        """
        now = now_ms()
        try:
            plan = on_success(msg, result, self._default_queue, now)
            steps = self._send_steps(plan.messages, now)
            if plan.join is not None:
                self.app.codec.encode_value(result)  # the join stores it: fail now
                steps.append(self._join_step(msg, plan.join, result, claimer))
        except FOLLOW_UP_ERRORS:
            raise
        except Exception as err:
            raise WorkflowError(
                f"what follows {msg.name} {msg.id} cannot be built: "
                f"{type(err).__name__}: {err}"
            ) from err
        return steps

    def after_failure(
        self, msg: TaskMessage, error: BaseException, claimer: str,
        traceback: str | None = None,
    ) -> list[Step]:
        """Return the steps after a task failed for good (or can never run).

        Error callbacks start (with the failure as data, ``traceback`` included), the
        rest of its chain is marked FAILURE, and a chord it belongs to fails (once).
        """
        try:
            return self._failure_steps(msg, error, claimer, traceback)
        except Exception as err:
            log.error("what follows a failed task cannot be built", id=msg.id,
                      error=f"{type(err).__name__}: {err}")
            return []

    def _failure_steps(
        self, msg: TaskMessage, error: BaseException, claimer: str, traceback: str | None
    ) -> list[Step]:
        now = now_ms()
        try:
            callbacks = on_failure(msg, error, self._default_queue, now, traceback)
            steps = self._send_steps(callbacks, now)
        except Exception as err:
            log.error("error callbacks cannot be sent", id=msg.id,
                      error=f"{type(err).__name__}: {err}")
            steps = []
        broken = broken_continuation(msg)
        if broken.doomed:
            # a revoked workflow's later steps read REVOKED: they were stopped, not failed
            revoked = isinstance(error, TaskRevoked) and not isinstance(error, TaskExpired)
            text = (f"upstream task {msg.id} ({msg.name}) "
                    f"{'was revoked' if revoked else 'failed'}: {error_text(error)}")
            state = states.REVOKED if revoked else states.FAILURE
            metas = [self._doomed(node, msg, type(error).__name__, text, now, state)
                     for node in broken.doomed]
            steps.append(store_all_step(self.app.backend, metas))
        if broken.join is not None:
            steps.append(self._chord_failure_step(msg, broken.join, error, claimer))
        return steps

    # -- steps ----------------------------------------------------------------------

    def _send_steps(self, messages: Sequence[TaskMessage], now: int) -> list[Step]:
        if not messages:
            return []
        return [send_all_step(self.app.broker, [self.app.outgoing(m, now) for m in messages])]

    def _join_step(self, msg: TaskMessage, join: Node, result: Any, claimer: str) -> Step:
        """Record the member; if it completes the chord, carry out the chord's decision.

        The join (every member) completes on the backend's callbacks, holding no thread;
        only a member that sees the group complete uses the pool to claim and fire.
        """
        backend = self.app.backend
        group_id, size = str(join["group"]), int(join["size"])

        def fire() -> _Plan:
            # Under load many members see the group complete (each counted its shard
            # after the last write to it): a cheap read turns most of them away, and the
            # claim comes before the work of gathering the results.
            claim = backend.group_claim(group_id)
            if claim is None:
                claim = backend.claim_group(group_id, claimer, GROUP_FIRED).result()
            return self._follow(join, msg, claimer, claim, None)

        def step(done: StepDone) -> None:
            def joined(future: Future[bool]) -> None:
                error = future.exception()
                if error is not None:
                    done(error)
                elif future.result():
                    self._threaded(fire)(done)
                else:
                    done(None)

            backend.join_group(group_id, int(join["index"]), size, result).add_done_callback(
                joined
            )

        return step

    def _chord_failure_step(
        self, msg: TaskMessage, join: Node, error: BaseException, claimer: str
    ) -> Step:
        """Fail the chord once: the body's rows FAILURE, the error callbacks sent."""
        return self._threaded(lambda: self._fail_chord(join, msg, error, claimer))

    def _fail_chord(
        self, join: Node, member: TaskMessage, error: BaseException | str, claimer: str
    ) -> _Plan:
        """Claim the chord as failed, then carry out whatever the trigger row decided.

        Blocking: in the pool.
        """
        group_id = str(join["group"])
        text = chord_failure_text(join, member, error)
        claim = self.app.backend.claim_group(group_id, claimer, GROUP_FAILED, text).result()
        return self._follow(join, member, claimer, claim, error)

    def _follow(
        self, join: Node, member: TaskMessage, claimer: str, claim: GroupClaim,
        error: BaseException | str | None,
    ) -> _Plan:
        """Carry out a chord's recorded decision (blocking; in the pool).

        - settled: the body (or the failure) is confirmed sent: nothing more to do;
        - decided by this record: send its messages, then settle the trigger;
        - decided by another claimer a while ago and still not settled (its worker died
          before the send was confirmed, and its record may come back only as another
          attempt): any member that completes the chord carries it out again — the ids
          are fixed, so this is a duplicate record, which the body's worker skips;
        - decided by another claimer just now: wait for it (:class:`ChordPending` is
          retried like an infrastructure error, so this member's offset waits too).
        """
        group_id = str(join["group"])
        if claim.settled:
            return _Plan([], [])
        if claim.claimer != claimer:
            age_s = (now_ms() - (claim.claimed_ms or 0)) / 1000
            if age_s < self.claim_patience_s:
                raise ChordPending(
                    f"chord {group_id}: {claim.outcome} by {claim.claimer} {age_s:.1f}s ago, "
                    "not yet confirmed"
                )
            log.warning("chord decision not confirmed by its claimer; carrying it out",
                        group=group_id, outcome=claim.outcome, claimer=claim.claimer,
                        age_s=round(age_s, 1), by=member.id)
        if claim.outcome == GROUP_FAILED:
            cause = error if error is not None and claim.claimer == claimer else (
                claim.reason or f"chord {group_id} failed")
            return self._failure_plan(join, member, cause)
        return self._body_plan(join, member)

    def _body_plan(self, join: Node, member: TaskMessage) -> _Plan:
        """Gather the members' results and build the chord body's records."""
        group_id, size = str(join["group"]), int(join["size"])
        results = self.app.backend.group_results(group_id, size).result()
        now = now_ms()
        try:
            messages = launch(join["body"], [results], [], member, self._default_queue, now)
            for body in messages:
                body.options[CHORD_BODY] = group_id
            records = [self.app.outgoing(m, now) for m in messages]
        except FOLLOW_UP_ERRORS as err:
            # The body can never be sent as it is: the chord fails (its trigger says
            # fired, so the failure is carried out under the fired decision).
            log.error("chord body cannot be sent: the chord fails", group=group_id,
                      error=str(err))
            text = f"chord {group_id}: the body cannot be sent: {error_text(err)}"
            return self._failure_plan(join, member, err, text)
        log.info("chord fired", group=group_id, size=size, by=member.id)
        return _Plan(records, [group_id])

    def _failure_plan(
        self, join: Node, member: TaskMessage, error: BaseException | str,
        text: str | None = None,
    ) -> _Plan:
        """The body's rows FAILURE (written here), the error callbacks to send.

        A chord whose body ends in the join of an outer chord (the chord is a member
        there) fails that outer chord too, and so on outwards.
        """
        group_id = str(join["group"])
        now = now_ms()
        text = text or (error if isinstance(error, str) else
                        chord_failure_text(join, member, error))
        error_type = type(error).__name__ if not isinstance(error, str) else "ChordError"
        self._store_all([self._doomed(node, member, error_type, text, now)
                         for node in task_nodes(join["body"])])
        log.warning("chord failed", group=group_id, member=join["index"], by=member.id,
                    error=error_text(error))
        plan = _Plan([], [group_id])
        try:
            callbacks = on_chord_failure(join, member, error, self._default_queue, now)
            plan.records += [self.app.outgoing(m, now) for m in callbacks]
        except Exception as err:
            log.error("chord error callbacks cannot be sent", group=group_id,
                      error=f"{type(err).__name__}: {err}")
        for outer in joins_in(join["body"]):
            inner = self._fail_chord(outer, member, error, f"{group_id}>{outer['group']}")
            plan.records += inner.records
            plan.settle += inner.settle
        return plan

    def _threaded(self, work: Callable[[], _Plan]) -> Step:
        """A step whose bookkeeping runs in the pool, then sends what it planned.

        The trigger rows are settled only after the broker confirmed every record.
        """
        broker, backend = self.app.broker, self.app.backend

        def step(done: StepDone) -> None:
            def settle(error: BaseException | None, plan: _Plan) -> None:
                if error is not None or not plan.settle:
                    done(error)
                    return
                gather = FanIn(len(plan.settle), done)
                for group_id in plan.settle:
                    backend.settle_group(group_id).add_done_callback(
                        lambda f: gather.one(f.exception()))

            def finished(future: Future[_Plan]) -> None:
                error = future.exception()
                if error is not None:
                    done(error)
                    return
                plan = future.result()
                send_all_step(broker, plan.records)(lambda err: settle(err, plan))

            self._pool.submit(work).add_done_callback(finished)

        return step

    # -- rows -----------------------------------------------------------------------

    def _store_all(self, metas: Sequence[TaskMeta]) -> None:
        """Write rows and wait until all are durable (blocking; in the pool)."""
        futures = [self.app.backend.store(meta) for meta in metas]
        for future in futures:
            future.result()

    def _doomed(
        self, node: Node, cause: TaskMessage, error_type: str, text: str, now: int,
        state: str = states.FAILURE,
    ) -> TaskMeta:
        """The row of a task that will never run because ``cause`` failed (or was revoked)."""
        options = node.get("options") or {}
        return TaskMeta(
            task_id=str(node["id"]),
            state=state,
            name=str(node["name"]),
            queue=str(options.get("queue") or self._default_queue),
            error_type=error_type,
            error_message=text,
            worker=self.worker,
            created_ms=now,
            finished_ms=now,
            parent_id=cause.id,
            root_id=cause.root_id or cause.id,
        )
