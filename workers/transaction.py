"""The worker's Kafka transaction: one owner for begin, produce, commit and abort.

Every transactional call follows librdkafka's error classes (INTRODUCTION.md,
"Transactional Producer"), checked in this order:

* ``fatal()``: the producer is unusable. The worker exits (FatalWorkerError) and
  supervisor restarts it; a restart is safe by the protocol in engine.py.
* ``txn_requires_abort()``: abort the transaction; the caller replays its input
  from the committed offsets (TransactionAborted).
* ``retriable()``: call the same operation again. send_offsets_to_transaction is
  retried with the identical offsets and group metadata; commit and abort resume
  where they were. A commit that has started is never switched to an abort.
* none of these flags: fatal.

No retry loop runs unbounded: every call and its retries run under the watchdog,
which ends the process (EXIT_STUCK) past TRANSACTION_WATCHDOG_S. That also covers
librdkafka calls that hang past their own timeout (send_offsets_to_transaction
when the group coordinator went away: librdkafka issues 5456 and 5511).
"""
from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from .errors import FatalWorkerError, OrdersError, StopRequested

log = logging.getLogger(__name__)

KAFKA_TIMEOUT_S = 15.0        # one transactional call; a retriable timeout is then retried
# A call plus its retries that outlives this ends the process; supervisor restarts
# it. The broker may expire the transaction first (TRANSACTION_TIMEOUT_MS, 10 s by
# default): the producer is then fenced, its next call fails fatally, and the
# process exits for the restart all the same.
TRANSACTION_WATCHDOG_S = 45.0
EXIT_STUCK = 3
RETRY_DELAY_S = 0.5           # first pause between retries of one call, doubling
RETRY_DELAY_MAX_S = 4.0


_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}


class State(enum.Enum):
    IDLE = "idle"              # no transaction open
    OPEN = "open"              # begun; messages and offsets may join it
    COMMITTING = "committing"  # commit_transaction started: only a commit may follow
    ABORTING = "aborting"      # abort_transaction started
    FAILED = "failed"          # a fatal error: the producer must not be used again


class Action(enum.Enum):
    RETRY = "retry"
    ABORT = "abort"
    FATAL = "fatal"


def classify(err: KafkaError) -> Action:
    """What librdkafka says to do after a failed transactional call."""
    if err.fatal():
        return Action.FATAL
    if err.txn_requires_abort():
        return Action.ABORT
    if err.retriable():
        return Action.RETRY
    return Action.FATAL


class TransactionAborted(OrdersError):
    """The transaction could not commit and was aborted: its messages and offsets are gone."""


class AbortFailed(FatalWorkerError):
    """A transaction that could not commit (an abortable error) could not be aborted either.

    The producer is unusable, but the transaction is known not to have committed:
    the broker aborts it (it timed out, or the next producer with its id fences it).
    Seen when the coordinator expired a transaction first (its producer paused past
    transaction.timeout.ms): the abort then fails as fenced.
    """


class Fenced(FatalWorkerError):
    """The broker refused this producer's epoch (fenced): it cannot be used again.

    Either another producer with the same transactional id started (its
    init_transactions first lets a commit already accepted finish), or the
    coordinator expired the open transaction (open past transaction.timeout.ms,
    say while this process was paused) and aborted it. A producer whose id no
    other process uses knows it is the second: its open transaction did not commit.
    """


class _AbortRequired(Exception):
    def __init__(self, what: str, err: KafkaError):
        super().__init__(f"{what}: {err.str()}")


class Watchdog:
    """Ends the process (EXIT_STUCK) if an armed section runs past its deadline.

    For library calls that can hang without honouring their timeout, and for
    retry loops around them: a restart is safe, a silent hang is not. Sections
    nest (the earliest deadline holds). One daemon thread, started on first use.
    """

    def __init__(self) -> None:
        self._deadline: float | None = None
        self._what = ""
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def armed(self, what: str, seconds: float) -> Iterator[None]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()
        outer = (self._what, self._deadline)
        deadline = time.monotonic() + seconds
        if self._deadline is None or deadline < self._deadline:
            self._what, self._deadline = what, deadline
        try:
            yield
        finally:
            self._what, self._deadline = outer

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                log.critical("stuck in %s for longer than its deadline: exiting so that the supervisor "
                             "restarts this worker", self._what)
                logging.shutdown()
                os._exit(EXIT_STUCK)


class KafkaTransaction:
    """The transaction of one transactional producer, with explicit states.

    ``producing()`` begins a transaction if none is open; ``commit()`` commits it
    with consumer offsets (beginning one if there are only offsets); ``abort()``
    aborts it and does nothing when none is open. Each raises FatalWorkerError
    (exit, supervisor restarts), StopRequested (asked to stop while retrying) or,
    for ``producing`` and ``commit``, TransactionAborted (replay from the
    committed offsets).
    """

    def __init__(self, producer: Producer, *, stop: Callable[[], bool], watchdog: Watchdog | None = None,
                 timeout_s: float = KAFKA_TIMEOUT_S, watchdog_s: float = TRANSACTION_WATCHDOG_S):
        self._producer = producer
        self._stop = stop
        self._watchdog = watchdog or Watchdog()
        self._timeout_s = timeout_s
        self._watchdog_s = watchdog_s
        self.state = State.IDLE
        self.opened_at: float | None = None     # monotonic time the open transaction began
        self._offsets: list[TopicPartition] = []  # sent into the open transaction
        self.aborts = 0  # transactions aborted by this producer (exported by `orders metrics`)

    @property
    def is_open(self) -> bool:
        """A transaction has begun and not ended (or the producer failed)."""
        return self.state is not State.IDLE

    def init(self) -> None:
        """init_transactions: fences an older instance and ends its open transaction."""
        with self._watchdog.armed("kafka init_transactions", self._watchdog_s):
            self._call("init_transactions", lambda: self._producer.init_transactions(self._timeout_s),
                       abortable=False)

    @contextlib.contextmanager
    def producing(self) -> Iterator[None]:
        """Produce into the open transaction (begun here if needed) inside this block.

        A KafkaException from ``produce`` inside the block is the transaction's: a
        fatal one ends the worker, any other aborts the transaction. (``produce``
        reports no transaction flags: when the transaction has failed it says
        only that it cannot take the message. Aborting is the way out.)
        """
        with self._watchdog.armed("kafka produce into the transaction", self._watchdog_s):
            self._begin()
            try:
                yield
            except KafkaException as exc:
                self.produce_failed(exc)

    def begin(self) -> None:
        """Begin a transaction if none is open (for callers that produce outside ``producing``)."""
        self._begin()

    def produce_failed(self, exc: KafkaException) -> NoReturn:
        """``produce`` raised ``exc`` inside the open transaction: end the worker or abort.

        Raises FatalWorkerError for a fatal error, else aborts and raises TransactionAborted.
        """
        err = exc.args[0]
        if err.fatal() or err.code() == KafkaError._FATAL:
            self._failed("produce", err, exc)
        log.warning("produce into the transaction failed action=abort reason=%s", err.str())
        self.abort()
        raise TransactionAborted(f"produce: {err.str()}") from exc

    def commit(self, offsets: list[TopicPartition], group_metadata: Any) -> list[TopicPartition]:
        """Commit the open transaction with ``offsets``; returns the offsets it committed.

        Begins a transaction when only offsets are to commit. A commit interrupted
        earlier (StopRequested) resumes with the offsets it had already sent.
        """
        if self.state is State.FAILED:
            raise FatalWorkerError("the transactional producer failed earlier")
        if self.state is State.ABORTING:
            self.abort()
            raise TransactionAborted("an abort was under way")
        if self.state is State.IDLE and not offsets:
            return []
        try:
            with self._watchdog.armed("kafka commit", self._watchdog_s):
                if self.state is State.IDLE:
                    self._begin()
                if self.state is State.OPEN:
                    if offsets:
                        # Retries send the identical offsets and metadata (librdkafka's rule).
                        self._call("send_offsets_to_transaction", lambda: self._producer.send_offsets_to_transaction(
                            offsets, group_metadata, self._timeout_s))
                        self._offsets = offsets
                    self.state = State.COMMITTING
                self._call("commit_transaction", lambda: self._producer.commit_transaction(self._timeout_s))
        except _AbortRequired as exc:
            log.warning("transaction commit failed action=abort reason=%s", exc)
            self.state = State.ABORTING  # legal after an abortable error, also from a commit
            try:
                self.abort()
            except FatalWorkerError as failed:
                raise AbortFailed(f"{exc}; {failed}") from failed
            raise TransactionAborted(str(exc)) from exc
        committed = self._offsets
        self._ended()
        return committed

    def abort(self) -> None:
        """Abort the open transaction; nothing when none is open. Its messages never become visible."""
        if self.state is State.IDLE:
            return
        if self.state is State.FAILED:
            raise FatalWorkerError("the transactional producer failed earlier")
        if self.state is State.COMMITTING:
            # librdkafka refuses an abort once a commit has begun (a retriable
            # conflict, for ever): only the commit could go on. The caller wants the
            # transaction gone, so leave it to the broker and a fresh process.
            self.state = State.FAILED
            raise FatalWorkerError("abort requested while a commit was in progress")
        self.state = State.ABORTING
        with self._watchdog.armed("kafka abort", self._watchdog_s):
            self._call("abort_transaction", lambda: self._producer.abort_transaction(self._timeout_s),
                       abortable=False)
        self._ended()
        self.aborts += 1

    # -- internals -------------------------------------------------------------------
    def _begin(self) -> None:
        if self.state is State.IDLE:
            self._call("begin_transaction", self._producer.begin_transaction, abortable=False)
            self.state, self.opened_at, self._offsets = State.OPEN, time.monotonic(), []
        elif self.state is not State.OPEN:
            raise FatalWorkerError(f"cannot add to a transaction that is {self.state.value}")

    def _ended(self) -> None:
        self.state, self.opened_at, self._offsets = State.IDLE, None, []

    def _call(self, what: str, call: Callable[[], None], *, abortable: bool = True) -> None:
        """Run one transactional API call, retrying it while librdkafka says so.

        The caller has armed the watchdog, which bounds the retries. Raises
        _AbortRequired (only if ``abortable``: librdkafka documents that begin,
        abort and init never ask for one), FatalWorkerError, StopRequested.
        """
        delay = RETRY_DELAY_S
        attempt = 0
        while True:
            attempt += 1
            try:
                call()
                return
            except KafkaException as exc:
                err = exc.args[0]
                action = classify(err)
                if action is Action.ABORT and abortable:
                    raise _AbortRequired(what, err) from exc
                if action is not Action.RETRY:
                    self._failed(what, err, exc)
                if self._stop():
                    raise StopRequested(f"stopped while retrying {what}") from exc
                log.warning("kafka transaction call failed, retrying call=%s attempt=%d retry_in_s=%.1f reason=%s",
                            what, attempt, delay, err.str())
            end = time.monotonic() + delay
            while time.monotonic() < end and not self._stop():
                time.sleep(0.1)
            delay = min(RETRY_DELAY_MAX_S, delay * 2)

    def _failed(self, what: str, err: KafkaError, exc: KafkaException) -> NoReturn:
        self.state = State.FAILED
        if err.code() in _FENCED:
            raise Fenced(f"{what} failed, fenced: {err.str()}") from exc
        raise FatalWorkerError(f"{what} failed fatally: {err.str()}") from exc
