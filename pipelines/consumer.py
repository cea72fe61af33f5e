"""The stream consumer: Kafka events topic → validation → lake + Redis, invalid → DLQ.

Topic names come from settings (``kafka_topic_events``, ``kafka_topic_dlq``; defaults
``shop.events`` and ``shop.events.dlq``).

Per poll batch:

1. in a prepare thread, validate the batch's records, all partitions at once, column-wise
   (:func:`pipelines.eventbatch.parse_batch`: :func:`~pipelines.schemas.parse_event`'s decisions in
   Arrow, so no Python object per event), send rejects to the DLQ topic with the original bytes and a
   ``reason`` header and count them per reason in Redis (crash point ``after_dlq``); claim each valid
   event's ``event_id`` in Redis with the record's Kafka position (``partition:offset``), one script
   call per batch;
2. in a persist thread, once 1 is done and the batch before has been handled, send the duplicates
   the claims found to the DLQ the same way (crash point ``after_claims``), hand the valid events to
   the Redis fold (3) and add them to the lake buffer (crash point ``after_buffer``);
3. beside it, fold them into the online state in Redis (one script call plus one pipeline), batch
   after batch in order: a click reaches the state ``/recommend`` reads within a poll, whatever the
   lake buffer does;
4. the lake buffer (a *flush group*: the valid events of consecutive polls) is written, in the persist
   thread, one file per Kafka partition and hour, named by the partition's offset range in the whole
   group, durable (tmp + fsync + rename), when it holds ``consumer_lake_flush_rows`` records (default
   ``consumer_max_records``: a full poll is written at once, so a backlog is consumed as before), when its
   oldest poll is ``consumer_lake_flush_s`` (5 s) old, when a poll comes back empty and it holds at least
   ``consumer_lake_idle_flush_rows`` records (caught up: the files are worth having), and on shutdown. At the
   shop's trickle a poll holds one or two events, and a file per poll and partition was ~47,000 files
   an hour; now it is one per partition and hour every few seconds;
5. while 1-4 run, the poll thread fetches the next batch (records decoded column-wise by
   :mod:`pipelines.kafka_columns`: kafka-python's own per-record decoding took a whole core), and
   commits each flush group whose files are durable, whose batches are folded and whose DLQ copies are
   acknowledged: one commit for the whole group, one past its last record per partition. So a commit
   may cover several polls, and never part of a group: a group's files end exactly where its commit does.
   Up to ``consumer_inflight_batches`` (2) polled batches are in stages 1-3 before the poll thread waits
   for the oldest; batches that only wait for their flush do not count (the buffer is bounded by the
   flush thresholds instead). With no next batch at hand the poll thread lets the batches in flight
   through 1-3 and commits what is durable at once.

So the handling of one batch overlaps the fetching of the next, and the stages of consecutive batches
overlap each other (Arrow parsing, Parquet encoding, fsync and Redis release the GIL); offsets are still
committed only once the files holding their events are durable, in order. If a commit is refused (the
group rebalanced), or a poll shows that partitions of batches in flight were revoked, every batch in flight
is dropped: the files written for them are removed, the buffer is discarded and their partitions still
owned are sought back, so they are consumed again (their DLQ copies may then be sent twice; the DLQ is
at-least-once). The buffer is not written on revocation: the rebalance has already happened when this
consumer sees it (kafka-python gives this consumer no hook before it), so those offsets can no longer be
committed by this member and its next owner replays them from the committed offset.

Exactly once in the lake, and why it is built this way. A crash anywhere before the commit
replays the uncommitted batches from the last committed offset. Two mechanisms make the replay harmless:

* Files carry their offset range (:func:`pipelines.lake.batch_file_name`). Commits happen only
  at flush group ends, after the group's files are durable, so on (re)gaining a partition every file
  of that partition whose range reaches the resume offset is a group that was never committed;
  :func:`pipelines.lake.remove_uncommitted` deletes those before the first replayed group is
  written. Unlike deterministic file names alone, this stays correct when the replayed groups
  have different boundaries (another ``max_poll_records``, another fetch split, another flush timing,
  another hour split) than the ones that crashed. A member that loses the partition during a rebalance
  finds its commit refused (or sees the revocation) and deletes its own files of those batches.
  Offsets mean something only within one log, so files also carry the broker's id of the topic's
  log (its topic id, :meth:`StreamConsumer._log_id`), and only files of the log being consumed are
  removed. A new log restarts at offset 0: a topic deleted and created again, or a broker that keeps
  its log in memory (tansu under ``make up``) restarted; a flush group never spans two logs. The log id is
  read from metadata fetched when a partition is taken on (:meth:`StreamConsumer._current_metadata`), never
  from the client's cache alone: a consumer that outlives a broker restart would otherwise name the new log's
  records by the old log's id and remove the old log's files as if they were its own uncommitted ones. The files
  of an earlier log are committed history: nothing can replay them. (A broker without topic ids, Kafka
  before 2.8, gets unnamed files, handled as before; so are files written before logs were named, which
  a broker with topic ids never removes: at worst, the uncommitted batch of a consumer killed just before
  the upgrade is stored twice, where removing them would delete every earlier file of a restarted tansu broker.)
* The event_id index in Redis (``SET NX GET`` with the record's position, one script call per
  partition) tells a genuine duplicate (same event_id, another position: client retries, a
  producer that sent twice) from the same record seen again after a crash (same position), so
  a replay is never rejected as a duplicate and a duplicate never gets stored twice.

The Redis online state is at-least-once: a crash between a batch's fold and the commit of its flush group
applies that batch's counters again on replay: a bounded, visible error of at most one flush interval of
events (``consumer_lake_flush_s`` or ``consumer_lake_flush_rows`` records, plus the batches in flight); the
lake, which training and the dashboard read, is exact. The same holds for a rebalance that drops the
batches in flight. When Redis is down the consumer retries with exponential backoff and does not commit,
so nothing is lost; when its event_id index was lost (a Redis without persistence restarted), duplicates
sent across that gap are not recognised.

Progress as the dashboard sees it: ``lag`` counts the records not yet polled (the online state follows
within a poll), ``rate_eps`` the records handled per second, ``consumed`` the records committed (in the
lake) and ``last_commit_ts`` the last commit, so the lake is behind the online state by the time since then
(at most about ``consumer_lake_flush_s`` while events flow).

For tests, ``SHOPREC_CRASH_AT=<point>[:<n>]`` makes the process SIGKILL itself the ``n``-th time
(default first) it reaches a point: ``after_dlq``, ``after_claims``, ``after_buffer`` (per batch),
``after_lake_write``, ``after_redis``, ``before_commit``, ``after_commit`` (per commit of a flush group).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import redis
from kafka import TopicPartition
from kafka.structs import MemberState, OffsetAndMetadata
from kafka.errors import CommitFailedError, RebalanceInProgressError
from tenacity import before_sleep_log, retry, retry_if_exception_type, stop_after_delay, wait_exponential

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import kafka_columns, kafka_io, lake
from pipelines.kafka_columns import RecordColumns
from pipelines.eventbatch import ParsedBatch, parse_batch
from pipelines.settings import Settings
from pipelines.state import OnlineState, lines

log = logging.getLogger(__name__)

JOIN_WAIT_MS = 15_000
CRASH_POINTS = ("after_dlq", "after_claims", "after_buffer", "after_lake_write", "after_redis", "before_commit",
                "after_commit")
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


@dataclass
class ConsumerStats:
    consumed: int = 0  # records committed (their valid events durable in the lake)
    stored: int = 0
    rejected: Counter = field(default_factory=Counter)
    batches: int = 0  # polls committed
    files: int = 0  # lake files written by the commits
    commits: int = 0
    handled: int = 0  # records polled and handed to the stages (the online state has them within a poll)
    last_commit_ts: float = 0.0


def _spans(polled: dict) -> dict[TopicPartition, tuple[int, int]]:
    """First and last offset of each partition's records in a poll."""
    return {tp: (int(cols.offsets[0]), int(cols.offsets[-1])) for tp, cols in polled.items()}


@dataclass
class _Batch:
    """One polled batch: its valid events (folded into Redis, buffered for the lake) and its offsets."""

    # the records of each partition, as polled (released once the batch is in the lake buffer)
    polled: dict[TopicPartition, RecordColumns] | None
    spans: dict = field(default_factory=dict)  # TopicPartition -> (first offset, last offset) in this batch
    n: int = 0  # records
    polled_at: float = field(default_factory=time.monotonic)
    valid: dict = field(default_factory=dict)  # TopicPartition -> valid events (a lake table), duplicates removed
    rejected: Counter = field(default_factory=Counter)
    # from the prepare thread: the validation of all partitions' records in order, the event_id claim
    parsed: ParsedBatch | None = None
    claim: Future | None = None
    prepared: Future | None = None  # validated, rejects in the DLQ, claims sent (the prepare thread)
    done: Future | None = None  # duplicates dropped, the Redis fold started, in the lake buffer (the persist thread)
    applied: Future | None = None  # the Redis fold (set by the persist thread before ``done`` completes)
    group: _FlushGroup | None = None  # the flush group it was buffered in (set before ``done`` completes)

    def __post_init__(self):
        if self.polled is not None and not self.spans:
            self.spans = _spans(self.polled)
            self.n = sum(len(cols) for cols in self.polled.values())

    def passed(self) -> bool:
        """Through the prepare, persist and fold stages (or failed at one): only its flush may be outstanding."""
        if not self.done.done():
            return False
        if self.done.cancelled() or self.done.exception() is not None:
            return True
        return self.applied is None or self.applied.done()

    def settled(self) -> bool:
        """Nothing left to wait for before its flush group is committed (or its failure raised)."""
        if not self.passed():
            return False
        if self.group is None:  # failed (or cancelled) before it was buffered
            return True
        return self.group.written.done() and all(b.passed() for b in self.group.batches)

    def record(self, i: int) -> tuple[RecordColumns, int]:
        """The ``i``-th record of the batch (partition after partition): its partition's columns and its row."""
        for cols in self.polled.values():
            if i < len(cols):
                return cols, i
            i -= len(cols)
        raise IndexError(i)

    def events(self) -> pa.Table | None:
        """The valid events of all partitions, partition after partition, each in offset order."""
        tables = list(self.valid.values())
        return pa.concat_tables(tables) if len(tables) > 1 else (tables[0] if tables else None)


@dataclass
class _FlushGroup:
    """Consecutive batches whose valid events are written together: one lake file per partition and hour,
    named by the partition's offset range in the whole group, and committed together."""

    logs: dict[str, str | None]  # the log id of each topic (a group never spans two logs of a topic)
    batches: list[_Batch] = field(default_factory=list)
    fresh: list[tuple[TopicPartition, int]] = field(default_factory=list)  # partitions to clean before writing
    records: int = 0
    written: Future = field(default_factory=Future)  # the files, durable; set by the persist thread

    def add(self, batch: _Batch, fresh: list, logs: dict) -> None:
        self.batches.append(batch)
        self.fresh += fresh
        self.logs.update(logs)
        self.records += batch.n
        batch.group = self

    def spans(self) -> dict[TopicPartition, tuple[int, int]]:
        """First and last offset of each partition's records in the group's batches."""
        out: dict[TopicPartition, tuple[int, int]] = {}
        for b in self.batches:
            for tp, (lo, hi) in b.spans.items():
                out[tp] = (min(out[tp][0], lo), max(out[tp][1], hi)) if tp in out else (lo, hi)
        return out

    def valid(self) -> dict[TopicPartition, pa.Table]:
        """The valid events of each partition in the group, in offset order."""
        tables: dict[TopicPartition, list[pa.Table]] = {}
        for b in self.batches:
            for tp, t in b.valid.items():
                tables.setdefault(tp, []).append(t)
        return {tp: pa.concat_tables(ts) if len(ts) > 1 else ts[0] for tp, ts in tables.items()}

    def offsets(self) -> dict:
        """Offsets to commit: one past each partition's last record in the group."""
        return {tp: OffsetAndMetadata(hi + 1, "", -1) for tp, (_, hi) in self.spans().items()}


class _CrashHook:
    """Test hook: SIGKILL this process at a named point (``SHOPREC_CRASH_AT=point[:n]``)."""

    def __init__(self, spec: str | None):
        self.point, self.remaining = None, 0
        if spec:
            point, _, n = spec.partition(":")
            if point not in CRASH_POINTS:
                raise ValueError(f"SHOPREC_CRASH_AT={spec!r}: the point must be one of {', '.join(CRASH_POINTS)}")
            self.point, self.remaining = point, int(n or 1)

    def __call__(self, point: str) -> None:
        if point == self.point:
            self.remaining -= 1
            if self.remaining <= 0:
                log.warning("SHOPREC_CRASH_AT=%s: killing myself", point)
                os.kill(os.getpid(), signal.SIGKILL)


def _redis_retry(fn):
    """Retry a Redis call with exponential backoff (0.2 s → 5 s) for up to 10 minutes while Redis is down."""
    return retry(retry=retry_if_exception_type(_REDIS_DOWN), wait=wait_exponential(multiplier=0.2, max=5),
                 stop=stop_after_delay(600), before_sleep=before_sleep_log(log, logging.WARNING), reraise=True)(fn)


class StreamConsumer:
    """One member of the ``shop.events`` consumer group."""

    def __init__(self, settings: Settings, state: OnlineState, *, group: str | None = None,
                 log_every_s: float = 10.0):
        self.settings = settings
        self.state = state
        self.consumer = kafka_columns.install(kafka_io.make_consumer(settings, (settings.kafka_topic_events,),
                                                                     group=group))
        self.producer = kafka_io.make_producer(settings)
        self.stats = ConsumerStats()
        self.log_every_s = log_every_s
        self.writer = uuid.uuid4().hex[:8]
        self.member = f"{socket.gethostname()}-{os.getpid()}-{self.writer}"  # its progress hash for the dashboard
        self._crash = _CrashHook(os.environ.get("SHOPREC_CRASH_AT"))
        # partitions cleaned since they were (re)assigned, with the log (topic id) they were cleaned for
        self._owned: dict[TopicPartition, str | None] = {}
        self._logs: dict[str, str] = {}  # the last log id the broker named for each topic
        now = time.monotonic()
        self._last_log = self._last_status = self._last_trending = now
        self._last_logged_count = self._last_status_count = 0
        self._rate = 0.0
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoprec-prepare")
        self._claims_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoprec-claims")
        self._state_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoprec-state")
        self._persist_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoprec-persist")
        self._inflight: deque[_Batch] = deque()  # handled, not yet committed (being handled or buffered); oldest first
        # the lake buffer and the first failure of a persist stage or a flush: owned by the persist thread
        self._open: _FlushGroup | None = None
        self._broken: BaseException | None = None
        self._flush_request: Future | None = None  # the last flush the poll thread asked the persist thread for
        self._trending: Future | None = None
        # the open hour's compaction (pipelines.compaction), in the background: readers of the open hour would
        # otherwise read every consumer file written since the hour began (one per partition and flush)
        self._compact_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoprec-compact")
        self._compaction: Future | None = None
        self._next_compaction = now + settings.lake_compact_open_every_s

    # --- one batch ---------------------------------------------------------------------------
    def process_batch(self, timeout_ms: int | None = None) -> int:
        """Poll once and handle what came; returns the number of records handled."""
        timeout_ms = timeout_ms or self.settings.consumer_poll_ms
        if not self.consumer.assignment():
            # kafka-python 3.0.12 drops a JoinGroup that completes between two polls and sends a new
            # one; tansu answers a join after ~3 s, so short polls can rejoin forever. Wait it out.
            timeout_ms = max(timeout_ms, JOIN_WAIT_MS)
        polled = {tp: RecordColumns.concat(chunks) for tp, chunks in
                  self.consumer.poll(timeout_ms=timeout_ms, max_records=self.settings.consumer_max_records).items()}
        assigned = self.consumer.assignment()
        self._owned = {tp: lid for tp, lid in self._owned.items() if tp in assigned}
        n = sum(len(cols) for cols in polled.values())
        revoked = {tp for b in self._inflight for tp in b.spans} - assigned
        if revoked:
            # a rebalance took partitions of batches in flight (it completed inside that poll): their offsets
            # cannot be committed by this member any more, and its next owner replays them from the committed
            # offset. Drop every batch in flight, and this poll too (it continues the partitions sought back).
            removed, dropped = self._drop_inflight([], [], _spans(polled))
            log.warning("partitions %s were revoked with batches in flight; %d files of %d batches removed, "
                        "their records are consumed again", sorted(tp.partition for tp in revoked), removed, dropped)
            n = 0
        elif n and any(tp not in self._owned for tp in polled) and not self._current_metadata():
            # which log these records belong to is not known: handling them could take an earlier log's files
            # for uncommitted ones of this log (their offsets overlap); poll them again once the broker answers
            self._rewind(_spans(polled))
            n = 0
        elif n:
            self._handle(polled)
        else:
            self._idle()
        self._maybe_flush()
        self._periodic()
        return n

    def _handle(self, polled: dict) -> None:
        # validation, the DLQ, the event_id claims, the lake buffer and the Redis fold run in worker
        # threads, each stage one batch at a time and in order, so this thread polls the next batch meanwhile
        batch = _Batch(polled)
        logs = {topic: self._log_id(topic) for topic in {tp.topic for tp in polled}}
        fresh = []
        for tp, cols in polled.items():
            log_id = logs[tp.topic]
            if tp in self._owned and self._owned[tp] == log_id:
                continue
            if tp in self._owned:  # the broker's log changed under us (the topic was recreated, the broker restarted)
                log.warning("topic %s is a new log (topic id %s, was %s): partition %d starts over at offset %d",
                            tp.topic, log_id, self._owned[tp], tp.partition, int(cols.offsets[0]))
            self._owned[tp] = log_id
            fresh.append((tp, int(cols.offsets[0])))
        batch.prepared = self._prepare_pool.submit(self._prepare, batch)
        batch.done = self._persist_pool.submit(self._persist, batch, fresh, logs)
        self._inflight.append(batch)
        self.stats.handled += batch.n
        # at most consumer_inflight_batches batches in the stages (batches that only wait for their flush do
        # not count: the flush thresholds bound those); the groups written meanwhile are committed, oldest first
        while True:
            busy = [b for b in self._inflight if not b.passed()]
            if len(busy) <= self.settings.consumer_inflight_batches:
                break
            self._wait_passed(busy[0])
        self._commit_settled()

    def _idle(self) -> None:
        """A poll brought nothing: let the batches in flight through their stages, write the buffer if it is
        worth a file (or due), and commit what is durable."""
        for b in list(self._inflight):
            self._wait_passed(b)
        buffered = [b for b in self._inflight if b.group is not None and not b.group.written.done()]
        if buffered and (sum(b.n for b in buffered) >= self.settings.consumer_lake_idle_flush_rows
                         or time.monotonic() - buffered[0].polled_at >= self.settings.consumer_lake_flush_s):
            wait([self._request_flush(new=True)])
        self._commit_settled()

    @staticmethod
    def _wait_passed(batch: _Batch) -> None:
        """Wait until ``batch`` is through its stages (a failure is raised when it is committed)."""
        wait([batch.done])
        if not batch.done.cancelled() and batch.done.exception() is None and batch.applied is not None:
            wait([batch.applied])

    def _commit_settled(self) -> bool:
        """Commit the flush groups at the front that are durable, oldest first; False when a commit was refused."""
        while self._inflight and self._inflight[0].settled():
            if not self._commit_oldest():
                return False
        return True

    def _maybe_flush(self) -> None:
        """Ask the persist thread to write the lake buffer when its oldest poll is ``consumer_lake_flush_s`` old."""
        open_group = self._open  # the persist thread's buffer (read only: the reference is all that is compared)
        oldest = next((b for b in self._inflight if (b.group is None and not b.done.done())
                       or (b.group is not None and b.group is open_group)), None)
        if oldest is not None and time.monotonic() - oldest.polled_at >= self.settings.consumer_lake_flush_s:
            self._request_flush()
        self._commit_settled()

    def _request_flush(self, new: bool = False) -> Future:
        """A flush of the lake buffer, queued behind the batches handed to the persist thread so far
        (``new``: even when an earlier request is still queued, which would not include later batches)."""
        if new or self._flush_request is None or self._flush_request.done():
            self._flush_request = self._persist_pool.submit(self._flush)
        return self._flush_request

    def _prepare(self, batch: _Batch) -> None:
        """Validate a batch (all partitions at once), send rejects to the DLQ and claim the valid events' ids."""
        s = self.settings
        columns = list(batch.polled.values())
        values = pa.concat_arrays([cols.values for cols in columns]) if len(columns) > 1 else columns[0].values
        parsed = parse_batch(values, max_bytes=s.max_event_bytes, now_ms=int(time.time() * 1000),
                             max_age_days=s.max_event_age_days, max_future_s=s.max_event_future_s)
        for i, err in parsed.rejects:
            batch.rejected[err.reason] += 1
            self._to_dlq(*batch.record(i), err.reason, err.message)
        if parsed.table.num_rows:
            # one script call claims the whole batch; the persist thread awaits it
            partition = np.repeat([tp.partition for tp in batch.polled], [len(cols) for cols in columns])
            offset = np.concatenate([cols.offsets for cols in columns])
            positions = lines(pc.binary_join_element_wise(pa.array(partition[parsed.index]).cast(pa.string()),
                                                          pa.array(offset[parsed.index]).cast(pa.string()), ":"))
            batch.claim = self._claims_pool.submit(self._redis, self.state.claim_event_ids,
                                                   lines(parsed.table["event_id"]), positions, s.dedup_window_s)
        batch.parsed = parsed
        if batch.rejected:
            self._redis(self.state.count_dlq, dict(batch.rejected))
            log.warning("rejected %d records: %s", sum(batch.rejected.values()), dict(batch.rejected))
        self._crash("after_dlq")

    def _drop_duplicates(self, batch: _Batch) -> None:
        """Fill ``batch.valid`` (per partition) from the answered claim; records already stored go to the DLQ."""
        table, index = batch.parsed.table, batch.parsed.index
        duplicates = batch.claim.result() if batch.claim is not None else {}
        if duplicates:
            for j, holder in duplicates.items():
                self._to_dlq(*batch.record(int(index[j])), "duplicate",
                             f"event_id {table['event_id'][j]} was already stored (record at {holder})")
            keep = np.ones(table.num_rows, dtype=bool)
            keep[list(duplicates)] = False
            table, index = table.filter(pa.array(keep)), index[keep]
            batch.rejected["duplicate"] += len(duplicates)
            self._redis(self.state.count_dlq, {"duplicate": len(duplicates)})
            log.warning("rejected %d records: %s", len(duplicates), {"duplicate": len(duplicates)})
        # rows are in record order, so each partition's rows are one slice
        start = 0
        for tp, cols in batch.polled.items():
            lo, hi = np.searchsorted(index, [start, start + len(cols)])
            if hi > lo:
                batch.valid[tp] = table.slice(lo, hi - lo)
            start += len(cols)
        batch.parsed = batch.claim = None

    def _to_dlq(self, cols: RecordColumns, row: int, reason: str, message: str) -> None:
        kafka_io.send_dlq(self.producer, cols.values[row].as_py(), reason, message, cols.keys[row].as_py(),
                          cols.record_headers(row), topic=self.settings.kafka_topic_dlq, source_topic=cols.topic)

    def _persist(self, batch: _Batch, fresh: list[tuple[TopicPartition, int]], logs: dict[str, str | None]) -> None:
        """Drop a batch's duplicates, start its Redis fold and add it to the lake buffer (in the persist thread);
        the buffer is written once it holds ``consumer_lake_flush_rows`` records.

        ``fresh``: the partitions (re)assigned (or whose log changed) since the last batch, with the offset
        they resume at; ``logs``: each topic's log id (:meth:`_log_id`) when the batch was polled.
        """
        if self._broken is not None:  # nothing after a batch that failed is buffered: it could be committed past it
            raise RuntimeError("not handled: an earlier batch failed") from self._broken
        try:
            batch.prepared.result()
            self._drop_duplicates(batch)
        except BaseException as err:
            self._flush()  # the batches before this one are sound: once written they can be committed
            self._broken = self._broken or err
            raise
        self._crash("after_claims")
        events = batch.events()
        # the Redis fold runs beside the lake buffer and the flushes (they mostly wait: on Redis, on Parquet
        # encoding and fsync, which release the GIL); the commit waits for the folds of the whole group, so
        # crash safety is unchanged. Folds stay in order: the state thread takes one at a time.
        if events:
            batch.applied = self._state_pool.submit(self._redis, self.state.apply_events, events)
        group = self._open
        if group is not None and (fresh or any(group.logs.get(t, lid) != lid for t, lid in logs.items())):
            # a partition starting over (reassigned, or a new log) starts a new group: the files of the one
            # before keep their own log and end where its commit will
            self._flush()
            if self._broken is not None:
                raise RuntimeError("not handled: the lake write before it failed") from self._broken
            group = None
        if group is None:
            group = self._open = _FlushGroup(logs={})
        group.add(batch, fresh, logs)
        batch.polled = None  # the raw records are not needed any more: the buffer holds the valid events only
        self._crash("after_buffer")
        if group.records >= self._flush_rows or not self.settings.consumer_lake_flush_s:
            self._flush()

    @property
    def _flush_rows(self) -> int:
        return self.settings.consumer_lake_flush_rows or self.settings.consumer_max_records

    def _flush(self) -> None:
        """Write the lake buffer (in the persist thread): one durable file per Kafka partition and hour."""
        group, self._open = self._open, None
        if group is None:
            return
        try:
            files = self._write_lake(group.spans(), group.valid(), group.fresh, group.logs)
        except BaseException as err:  # noqa: BLE001 - raised by the group's commit; nothing after it is buffered
            self._broken = self._broken or err
            group.written.set_exception(err)
        else:
            group.written.set_result(files)

    def _discard(self) -> None:
        """Drop the lake buffer unwritten (in the persist thread, after the batches handed to it so far)."""
        group, self._open = self._open, None
        if group is not None:
            group.written.cancel()

    def _finish(self) -> bool:
        """Write the lake buffer and commit every batch in flight, oldest first; False when a commit was refused."""
        if self._inflight:
            wait([self._request_flush(new=True)])
        while self._inflight:
            if not self._commit_oldest():
                return False
        return True

    def _commit_oldest(self) -> bool:
        """Wait for the oldest flush group in flight to be durable, then commit its offsets; False when refused.

        After a refused commit every batch in flight is dropped (:meth:`_drop_inflight`), so they are
        consumed again.
        """
        head = self._inflight[0]
        try:
            head.done.result()
            group = head.group
            written = group.written.result()
            for b in group.batches:
                b.done.result()
                if b.applied is not None:
                    b.applied.result()
        except BaseException:
            # nothing past a batch that was not written may be committed: the later ones are dropped
            # too (their records are consumed again after a restart, their files removed then)
            for later in self._inflight:
                later.done.cancel()
            self._inflight.clear()
            self._persist_pool.submit(self._discard)
            raise
        batches = [self._inflight.popleft() for _ in group.batches]
        assert batches == group.batches, "a flush group is a run of consecutive batches in flight"
        self._crash("after_lake_write")
        self._crash("after_redis")
        if any(b.rejected for b in batches):
            self.producer.flush()  # the DLQ copies must be in Kafka before their offsets are committed
        self._crash("before_commit")
        offsets = group.offsets()
        try:
            if not set(offsets) <= self.consumer.assignment():
                # kafka-python commits under the new generation without checking ownership
                raise CommitFailedError("partitions of this batch were revoked while it was written")
            self.consumer.commit(offsets)
        except (CommitFailedError, RebalanceInProgressError) as err:
            # the group rebalanced under us (or is rebalancing: kafka-python then refuses the commit
            # before sending it, e.g. when a member joins): the partitions' next owner, perhaps this
            # consumer again, replays these batches from the committed offset, so the files written
            # here must go (it deletes uncommitted files too, but may have looked already)
            removed, dropped = self._drop_inflight(batches, written)
            log.warning("commit refused after a rebalance (%s); %d files of %d batches removed", err, removed, dropped)
            return False
        self._crash("after_commit")
        self.stats.consumed += sum(b.n for b in batches)
        self.stats.stored += sum(t.num_rows for b in batches for t in b.valid.values())
        for b in batches:
            self.stats.rejected.update(b.rejected)
        self.stats.batches += len(batches)
        self.stats.files += len(written)
        self.stats.commits += 1
        self.stats.last_commit_ts = time.time()
        return True

    def _drop_inflight(self, dropped: list[_Batch], written: list, *spans: dict) -> tuple[int, int]:
        """Forget ``dropped`` (files ``written``) and every batch in flight: remove the files written for
        them, discard the lake buffer, and seek their partitions (and those of ``spans``) back.

        A batch whose stages have not started is cancelled. Each partition that is still ours is sought
        back to its first record in them (kafka-python keeps the position of a partition that stays
        assigned across a rebalance), so they are consumed again; the partitions count as reassigned
        (their uncommitted files are removed again before the next write). Returns the number of files
        removed and of batches dropped.
        """
        later = list(self._inflight)
        self._inflight.clear()
        for b in later:
            b.done.cancel()
        wait([self._persist_pool.submit(self._discard)])  # after the persist stages and flushes already running
        files = set(written)
        for b in later:
            if b.done.cancelled() or b.done.exception() is not None or b.group is None:
                continue
            w = b.group.written
            if w.done() and not w.cancelled() and w.exception() is None:
                files.update(w.result())
        for path in files:
            path.unlink(missing_ok=True)
        self._owned.clear()
        self._rewind(*(b.spans for b in dropped + later), *spans)
        return len(files), len(dropped) + len(later)

    def _rewind(self, *spans: dict) -> None:
        """Seek each partition of ``spans`` (``{tp: (first, last)}``) that is still assigned back to its first offset."""
        first: dict[TopicPartition, int] = {}
        for span in spans:
            for tp, (lo, _) in span.items():
                first[tp] = min(first.get(tp, lo), lo)
        assigned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                try:
                    self.consumer.seek(tp, offset)
                except ValueError:  # revoked meanwhile: its new owner resumes at the committed offset
                    pass

    def _write_lake(self, spans: dict, valid: dict[TopicPartition, pa.Table],
                    fresh: list[tuple[TopicPartition, int]], logs: dict[str, str | None]) -> list:
        """One durable file per Kafka partition and hour, named by the partition's log and offsets in a flush group.

        ``spans``: each partition's first and last offset in the group (the records polled, valid or not);
        ``fresh``: the partitions (re)assigned (or whose log changed) since the last group, with the offset
        they resume at; ``logs``: each topic's log id (:meth:`_log_id`) when the group's batches were polled.
        """
        s = self.settings
        for tp, resume in fresh:
            # first group since this partition was (re)assigned: drop files of uncommitted groups of this log
            now_ms = int(time.time() * 1000)
            removed = lake.remove_uncommitted(s.lake_dir, tp.topic, tp.partition, resume, log=logs[tp.topic],
                                              since_ms=now_ms - (s.max_event_age_days + 1) * 86_400_000,
                                              until_ms=now_ms + s.max_event_future_s * 1000 + 3_600_000)
            if removed:
                log.info("partition %s resumes at %d (log %s): removed %d uncommitted lake files",
                         tp.partition, resume, logs[tp.topic], len(removed))
        batches = [(lake.batch_file_name(tp.topic, tp.partition, spans[tp][0], spans[tp][1], self.writer,
                                         log=logs[tp.topic]), events)
                   for tp, events in valid.items()]
        return lake.write_batches(s.lake_dir, batches, threads=s.consumer_lake_threads) if batches else []

    def _current_metadata(self, timeout_s: float = 10.0) -> bool:
        """Fetch the cluster's metadata now (the topics' log ids with it); False when it does not come in time.

        Called before a partition is taken on (assigned, or sought back after a refused commit). The metadata
        the client has cached can be older than the log the records come from: a broker restarted during an
        outage serves a new log (offsets from 0 again) while the cache still names the old one for up to the
        refresh backoff, and the new log's first group would remove the old log's files as uncommitted.
        """
        done = threading.Event()
        update = self.consumer._client.cluster.request_update()
        update.add_both(lambda _: done.set())
        if done.wait(timeout_s) and update.succeeded():
            return True
        log.warning("the broker did not send its metadata within %.0fs (%s): the records polled are read again",
                    timeout_s, update.exception or "no answer")
        return False

    def _log_id(self, topic: str) -> str | None:
        """The broker's id of ``topic``'s log as 32 hex digits: its topic id (Kafka 2.8+, KIP-516), from the
        metadata the consumer fetched the topic's partitions by; None where the broker names none.

        A topic id is given once, when the topic is created: a topic deleted and created again, or a
        broker that lost its log (tansu, memory only, restarted) gets a new one; a real Kafka cluster's
        brokers restarting keep it. Once named, a topic's log is never None for this consumer (a metadata
        answer without the topic would otherwise make it remove the unnamed files of earlier logs).
        """
        topic_id = self.consumer._client.cluster.topic_id(topic)  # kafka-python has no public accessor
        if topic_id is not None and topic_id.int:
            if self._logs.get(topic) != topic_id.hex:
                log.info("topic %s: consuming log %s (its topic id)", topic, topic_id.hex)
            self._logs[topic] = topic_id.hex
        return self._logs.get(topic)

    @staticmethod
    @_redis_retry
    def _redis(fn, *args):
        return fn(*args)

    # --- progress ------------------------------------------------------------------------------
    def lag(self) -> int:
        """Records behind the ends of this member's partitions (from ``highwater``, which is exact on tansu).

        Measured from the position, not the committed offset: records polled are in the online state within
        a poll, while the lake (and the commit) follows within ``consumer_lake_flush_s`` (``last_commit_ts``).

        0 for a member that owns no partition (tansu's ListOffsets answers are not reliable enough to
        measure the whole group's backlog from here): the log line and the status say so.
        """
        total = 0
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)
            pos = self.consumer.position(tp)
            if hw is not None and pos is not None:
                total += max(0, hw - pos)
        return total

    def _refresh_trending(self) -> None:
        try:
            self.state.refresh_trending()
        except redis.RedisError as err:
            log.warning("trending refresh skipped: %s", err)

    def _periodic(self) -> None:
        """Refresh trending, write the status hash for the dashboard, log rate and lag."""
        now = time.monotonic()
        if now - self._last_trending > 2.0 and (self._trending is None or self._trending.done()):
            # a ZUNIONSTORE over the hourly counts (tens of ms on a large catalog): off this thread
            self._last_trending = now
            self._trending = self._state_pool.submit(self._refresh_trending)
        if now - self._last_status >= self.settings.consumer_status_every_s:
            # records handled (in the online state within a poll), not committed: commits come once per
            # lake flush, which would make the rate jump between 0 and several times the real one
            self._rate = (self.stats.handled - self._last_status_count) / (now - self._last_status)
            self._last_status, self._last_status_count = now, self.stats.handled
            try:
                self.state.set_consumer_status(self.member, lag=self.lag(), rate_eps=round(self._rate, 1),
                                               consumed=self.stats.consumed, last_commit_ts=self.stats.last_commit_ts,
                                               partitions=len(self.consumer.assignment()), updated_ts=time.time())
            except redis.RedisError as err:
                log.warning("consumer status not written: %s", err)
        if now - self._last_log >= self.log_every_s:
            rate = (self.stats.handled - self._last_logged_count) / (now - self._last_log)
            self._last_log, self._last_logged_count = now, self.stats.handled
            partitions = len(self.consumer.assignment())
            log.log(logging.INFO if partitions else logging.WARNING,
                    "consumed=%d stored=%d rejected=%d rate=%.0f ev/s lag=%d partitions=%d%s", self.stats.consumed,
                    self.stats.stored, sum(self.stats.rejected.values()), rate, self.lag(), partitions,
                    "" if partitions else " (this member has no partition: more consumers than partitions, or "
                    "the group has not settled; lag is the whole group's)")

    def run(self, stop: threading.Event | None = None, *, idle_exit_s: float | None = None) -> ConsumerStats:
        """Consume until ``stop`` is set (or no record came for ``idle_exit_s``)."""
        stop = stop or threading.Event()
        idle_since = time.monotonic()
        try:
            while not stop.is_set():
                self._maybe_compact()
                if self.process_batch():
                    idle_since = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
        finally:
            self.close()
        return self.stats

    def _maybe_compact(self) -> None:
        """Start a compaction of the current and the previous hour when one is due and none is running."""
        every = self.settings.lake_compact_open_every_s
        now = time.monotonic()
        if not every or now < self._next_compaction or (self._compaction and not self._compaction.done()):
            return
        self._next_compaction = now + every
        self._compaction = self._compact_pool.submit(self._compact_open_hours)

    def _compact_open_hours(self) -> None:
        from pipelines import compaction

        t = datetime.now(timezone.utc)
        for key in (lake.partition_key(int((t - timedelta(hours=1)).timestamp() * 1000)),
                    lake.partition_key(int(t.timestamp() * 1000))):
            try:
                compaction.compact_partition(self.settings.lake_dir, key, self.settings)
            except Exception as err:  # noqa: BLE001 - the hourly asset compacts it later anyway
                log.warning("compaction of the open hour %s failed: %s; the hourly events asset retries", key, err)

    def close(self) -> None:
        self._compact_pool.shutdown(wait=True, cancel_futures=True)
        try:
            self._finish()  # the lake buffer is written and committed
        except Exception:  # noqa: BLE001 - closing anyway; the uncommitted batch is replayed by the next owner
            log.exception("the last batch could not be committed; it will be consumed again")
        # claims still queued belong to batches that will not be committed (their records are replayed);
        # with Redis down each would retry for minutes
        self._prepare_pool.shutdown(wait=True, cancel_futures=True)
        self._claims_pool.shutdown(wait=True, cancel_futures=True)
        for pool in (self._persist_pool, self._state_pool):
            pool.shutdown(wait=True)
        try:
            self.producer.flush(timeout=5)
        finally:
            self.producer.close(timeout=5)
            self._settle_membership()
            self.consumer.close()
            log.info("consumer stopped: %d consumed, %d stored, %d rejected in %d batches (%d lake files, %d commits); "
                     "it left the group", self.stats.consumed, self.stats.stored, sum(self.stats.rejected.values()),
                     self.stats.batches, self.stats.files, self.stats.commits)

    def _settle_membership(self, timeout_s: float = 30.0) -> None:
        """Before leaving the group, let a rebalance this member takes part in finish.

        A member that leaves while its group rebalances (a member joining, another leaving) leaves the
        tansu broker's group stuck: from then on no member, old or new, is given a partition until the
        broker restarts (reproduced with two plain kafka-python consumers). So a closing consumer first
        polls until it is a stable member again. Records polled here are not committed: whoever owns
        their partitions next consumes them.
        """
        deadline = time.monotonic() + timeout_s
        try:
            while (self.consumer.group_metadata().state == MemberState.REBALANCING
                   and time.monotonic() < deadline):
                self.consumer.poll(timeout_ms=100)
        except Exception as err:  # noqa: BLE001 - leaving anyway
            log.warning("could not wait for the group to settle before leaving: %s", err)

