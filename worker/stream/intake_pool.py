"""Intake processes: the hit path's per-record CPU work, off the loop thread's GIL.

When the same message is posted a hundred thousand times (a raid, a spam wave) nearly every event is a
verdict-cache hit, and the worker's throughput is what one Python thread can do per record: decode and
validate the event, route it, hash its cache key, read the cache, build and encode the verdict — beside the
Kafka client's own per-record work, on the same GIL. This module moves that work to
``batching.intake_processes`` worker processes (fresh interpreters: no threads or GPU state inherited), the way
arroyo's ``RunTaskWithMultiprocessing`` moves a transform: the loop thread keeps the consumer, the offsets,
the commits and the delivery rule; a process gets a chunk of records, publishes the verdicts it can answer on
a producer of its own (made from the same settings), waits for the broker's acks, writes their published
markers, and returns the indices of the records it published. The worker completes exactly those offsets. A
process works on one chunk at a time, on one producer. (Two producers used in turn, so that one chunk's acks
arrived while the next was worked on, were 10–15% slower on 2 cores: every producer sends produce requests of
its own, and the broker's cost is mostly per request. The loop thread works meanwhile, and a second chunk waits
at the process: it never waits for the loop thread.)

A process answers only what it can answer completely: a text event whose verdict is in the cache, or which
a halting blocklist decides. Everything else — bad input, events with images, cache misses, events another
pool judges — comes back unanswered and takes the loop thread's own path (``worker.stream.intake`` onwards),
which decodes it again: exactly one path decides rejections, images and model work. So does a verdict the
broker did not acknowledge within ``ACK_TIMEOUT_S`` (it is published again there: at least once, never
lost). A revoke or drain waits for the chunks out before it commits (``Intake.settle``). Metrics the processes
would count (cache hits, blocklist hits, the review band, stage times) travel back with the answers and are
counted by the worker process, the one whose metrics are scraped.

The processes start on the first burst (a poll of ``START_BURST`` records or more), in the background;
records keep taking the loop thread's path until they are ready, so a quiet worker never pays for them.
Chunks go to the processes only while they pay: when fewer than half of the records sent recently were
answered there (a stream of misses: the model, not intake, is the bottleneck, and the double decode is
wasted), only every ``PROBE_EVERY``-th chunk goes, to notice when hits return. A process is given a second
chunk while it works on one, so it never waits for the loop thread between chunks; while every process has
``BUSY_CHUNKS`` out, or when the records out would reach ``batching.max_in_flight``, the loop thread takes the
next poll itself: the two work side by side, and queued chunks never fill the in-flight bound (that paused
the partitions, which on confluent-kafka costs a re-fetch at every resume). A process that dies, fails or
hangs (no answer within ``CHUNK_TIMEOUT_S``) costs nothing but time: the chunk's records take the loop
thread's path, the processes are stopped, and started again on the next burst.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from worker.config import Settings
from worker.contracts.dead_letters import SourceCoordinates, utc_now_rfc3339
from worker.contracts.decode import decode_event
from worker.contracts.events import ChatEvent
from worker.contracts.verdicts import ModelInfo
from worker.engine.policy import Policy, resolve_policy
from worker.stream.items import record_age_seconds
from worker.stream.records import Encoder, VerdictFacts, answer_output

if TYPE_CHECKING:
    from worker.cache.published import PublishedMarkers
    from worker.engine.blocklist import BlocklistHit
    from worker.engine.registry import ModelRegistry
    from worker.moderation.moderator import Cache, Moderator

log = logging.getLogger(__name__)

START_BURST = 128  # records in one poll that start the processes (a quiet worker never needs them)
PROBE_EVERY = 8  # while few records are answered there, every this-many-th chunk still goes
PAYS_ABOVE = 0.5  # fraction of a chunk's records answered in a process above which sending chunks pays
RECENT_WEIGHT = 0.3  # weight of the newest chunk in the recent answered fraction (exponential average)
# Chunks out at a process (one it works on, one waiting, so it never idles between chunks) above which the loop
# thread takes the next poll itself (work sharing).
BUSY_CHUNKS = 2
MAX_RESTARTS = 5  # pools started again after a process died; past it the loop thread does all the work
CHUNK_TIMEOUT_S = 30.0  # a chunk not answered by then is redone on the loop thread (its process is stopped)
STOP_TIMEOUT_S = 5.0
# A process waits this long for the broker's acks of a chunk's verdicts (below CHUNK_TIMEOUT_S): what is not
# acknowledged by then is left to the loop thread's path.
ACK_TIMEOUT_S = 20.0
# The same wait on the loop thread (``Intake``), which stops the loop meanwhile: a broker that slow is degraded, and
# the records take the staged path (published again: at least once).
LOOP_ACK_TIMEOUT_S = 5.0

# One record sent to a process: (value, time.monotonic() when consumed, topic, partition, offset, the record's
# timestamp in ms). CLOCK_MONOTONIC is one clock for every process on the host, so latency_ms is measured as in
# the worker.
Item = tuple[bytes | None, float, str, int, int, int]
# Verdicts counted by label set, as ``metrics.record_verdicts`` takes them: (decision, codes, cached, model).
Tally = dict[tuple[str, tuple[str, ...], bool, str], int]


class ChunkAnswers(NamedTuple):
    """What a process did with a chunk: the records whose verdicts it published, and what to count about them.

    ``published`` holds the indices (in the chunk) of the records whose every output record the broker
    acknowledged (their published markers are written, too); every other record takes the loop thread's
    path. Metrics travel back as counts and observed values: the worker process is the one scraped.
    """

    published: list[int]
    tally: Tally
    review: int  # verdicts in a policy's human-review band
    blocklist_hits: list[tuple[tuple[BlocklistHit, ...], bool]]  # (hits, halted) of verdicts with hits
    end_to_end_s: list[float]  # record timestamp → acknowledged, per published record that has one
    event_lag_s: list[float]  # event created_at → acknowledged, per published event that has one
    decode_s: float  # decode, route and key of the whole chunk
    cache_s: float  # its one cache read
    publish_s: float  # send, wait for the acks, write the markers
    cache_hits: int
    # Misses a halting blocklist decided (the others are looked up again, and counted, there).
    cache_misses: int
    failed_deliveries: int  # answered, but not acknowledged in time: redone on the loop thread


@dataclass(slots=True, frozen=True)
class ModelView:
    """What routing, keying and verdicts need of a loaded engine: its identity and policies, no weights."""

    model_info: ModelInfo
    family: str | None
    policies: Mapping[str, Policy]
    default_policy_id: str

    def policy_for(self, policy_id: str | None) -> Policy:
        """As ``GuardEngine.policy_for``."""
        return resolve_policy(self.policies, policy_id, self.default_policy_id)


def model_views(models: ModelRegistry) -> dict[str, ModelView]:
    """The picklable views of ``models``' engines, by model name."""
    return {
        name: ModelView(
            engine.model_info, getattr(engine, "family", None), engine.policies, engine.default_policy_id
        )
        for name, engine in models.engines.items()
    }


# ------------------------------------------------------------------------------------------ in the processes


@dataclass(slots=True)
class AnswerContext:
    """What ``publish_chunk`` answers and publishes with: the core, the cache, the markers and a producer."""

    settings: Settings
    moderator: Moderator
    cache: Cache
    markers: PublishedMarkers
    encoder: Encoder
    producer: Any
    # The loop thread's own context: markers go to the markers' writer thread (with the high-water marks),
    # so the loop never waits for that round trip; a process writes them itself before it reports.
    marks_async: bool = False


# A process's answer context (``_initialize``): publish_chunk's default.
_CONTEXT: AnswerContext | None = None


def answer_producer(settings: Settings) -> Any:
    """The producer ``publish_chunk`` publishes on: on confluent-kafka it reports failed deliveries only (a
    chunk's records are sent unwatched and waited for with one flush: ``BatchPublisher``)."""
    from worker.stream.kafka_clients import make_producer
    from worker.stream.publisher import output_topics

    if settings.kafka.client == "confluent-kafka":
        from worker.stream.confluent_clients import make_confluent_producer

        producer: Any = make_confluent_producer(settings, reports="errors")
    else:
        producer = make_producer(settings)
    for topic in output_topics(settings.topics):  # the first sends must not wait for metadata
        producer.partitions_for(topic)
    return producer


def _initialize(settings: Settings, views: dict[str, ModelView]) -> None:
    """Process initializer: the core over model views, a cache connection, and a producer of its own."""
    from worker.cache.published import PublishedMarkers
    from worker.cache.redis_cache import VerdictCache
    from worker.engine.registry import ModelRegistry
    from worker.moderation.moderator import Moderator
    from worker.ops.heap import settle_after_load

    registry = ModelRegistry(views, settings)  # type: ignore[arg-type]  # a view has what routing reads
    cache = VerdictCache(settings.redis)
    moderator, markers, encoder = (
        Moderator(registry, settings),
        PublishedMarkers(cache, settings),
        Encoder(settings.topics),
    )
    global _CONTEXT
    _CONTEXT = AnswerContext(settings, moderator, cache, markers, encoder, answer_producer(settings))
    settle_after_load()


def _close() -> None:
    """Process shutdown: flush and close the producer (what is not acknowledged by then is redone)."""
    if _CONTEXT is not None:
        _CONTEXT.producer.close(timeout=STOP_TIMEOUT_S)
        _CONTEXT.cache.close()  # type: ignore[attr-defined]  # the process's own VerdictCache


@dataclass(slots=True)
class PublishedChunk:
    """A chunk whose verdicts are sent (``publish_chunk``), waiting for the broker's acks (``finish``).

    In an intake process, or on the loop thread with a context of its own (``Intake``: a poll it takes while the
    processes are busy). The chunk is answered once the broker acknowledged its verdicts (or the ack timeout
    passed: what is not acknowledged then is left to the loop thread's staged path, and may be published twice
    — at least once, never lost). The markers of the acknowledged records are written before the answer, so
    the worker may raise their partitions' high-water marks as soon as it reads it.
    """

    items: Sequence[Item]
    context: AnswerContext
    publisher: Any  # BatchPublisher
    # Per published index: what is counted once the broker acknowledged it (a verdict that is not is
    # redone, and counted, on the loop thread).
    answered: dict[int, tuple[VerdictFacts, tuple[BlocklistHit, ...], bool, bool]]
    decode_s: float
    cache_s: float
    published_at: float
    hits: int
    misses: int

    def settled(self) -> bool:
        """Whether the broker has answered every verdict sent (``finish`` would not wait), without waiting."""
        return not self.answered or self.publisher.settled()

    def finish(self, ack_timeout_s: float = ACK_TIMEOUT_S) -> ChunkAnswers:
        """Wait for the acks (up to ``ack_timeout_s``), write the acknowledged records' markers: the answers."""
        from kafka.structs import TopicPartition

        from worker.cache.published import record_digest
        from worker.contracts.verdicts import event_lag_seconds

        items, answered = self.items, self.answered
        published: list[int] = []
        tally: Tally = {}
        review = 0
        blocklist_hits = []
        end_to_end: list[float] = []
        lags: list[float] = []
        if answered:
            # What is not acknowledged in time is left to the loop thread.
            acknowledged = self.publisher.wait(ack_timeout_s)
            now = time.time()
            created: dict[str | None, float | None] = {}  # lag per created_at (a burst shares its stamps)
            for index in acknowledged:
                published.append(index)
                facts, routed_hits, halted, in_review = answered[index]
                labels = facts[:4]  # decision, codes, cached, model
                tally[labels] = tally.get(labels, 0) + 1
                review += in_review
                if routed_hits:
                    blocklist_hits.append((routed_hits, halted))
                age = record_age_seconds(items[index][5], now)
                if age is not None:
                    end_to_end.append(age)
                stamp = facts.created_at
                lag = (
                    created[stamp]
                    if stamp in created
                    else created.setdefault(stamp, event_lag_seconds(stamp, now))
                )
                if lag is not None:
                    lags.append(lag)
            published.sort()
            partitions: dict[tuple[str, int], TopicPartition] = {}
            marked = []
            for i in published:
                raw, _, topic, partition, offset, _ = items[i]
                tp = partitions.get((topic, partition)) or partitions.setdefault(
                    (topic, partition), TopicPartition(topic, partition)
                )
                marked.append((tp, offset, record_digest(raw)))
            if self.context.marks_async:
                self.context.markers.mark(marked)
            else:
                self.context.markers.write_offsets(marked)
        return ChunkAnswers(
            published,
            tally,
            review,
            blocklist_hits,
            end_to_end,
            lags,
            self.decode_s,
            self.cache_s,
            time.perf_counter() - self.published_at,
            self.hits,
            self.misses,
            len(answered) - len(published),  # failed, or still unacknowledged at the timeout
        )


def publish_chunk(items: Sequence[Item], context: AnswerContext | None = None) -> PublishedChunk:
    """Decode, route, key, read the cache, and send the verdicts that can be answered of ``items`` (see the module
    docstring); ``PublishedChunk.finish`` waits for their acks."""
    from worker.moderation.moderator import Routed
    from worker.stream.publisher import BatchPublisher

    context = context or _CONTEXT
    if context is None:
        raise RuntimeError(
            "publish_chunk runs in an intake process, after its initializer, or with a context"
        )
    moderator = context.moderator
    started = time.perf_counter()
    keyed = []
    for index, (raw, received, topic, partition, offset, _) in enumerate(items):
        event = decode_event(raw, context.settings)
        if not isinstance(event, ChatEvent) or event.images:
            continue  # a rejection or images: the loop thread's path
        routed = moderator.route(event)
        if isinstance(routed, Routed):
            keyed.append(
                (index, moderator.key(routed), received, SourceCoordinates(topic, partition, offset))
            )
    decoded = time.perf_counter()
    answers = moderator.answers(context.cache, [k for _, k, _, _ in keyed])
    looked_up = time.perf_counter()
    publisher = BatchPublisher(context.producer, context.settings.topics, context.encoder)
    hits = misses = 0
    answered: dict[int, tuple[VerdictFacts, tuple[BlocklistHit, ...], bool, bool]] = {}
    encoder = publisher.encoder
    decided_at = orjson.dumps(utc_now_rfc3339())  # one decision time for the chunk's verdicts
    for (index, item, received, source), answer in zip(keyed, answers, strict=True):
        if answer is None:
            continue
        latency_ms = (time.monotonic() - received) * 1000.0
        output, facts, in_review = answer_output(
            moderator, encoder, item, answer, latency_ms=latency_ms, source=source, decided_at=decided_at
        )
        publisher.publish(output, index)
        answered[index] = (facts, item.routed.hits, answer.result.halted, in_review)
        if answer.cached:
            hits += 1
        else:
            misses += 1
    return PublishedChunk(
        items, context, publisher, answered, decoded - started, looked_up - decoded, looked_up, hits, misses
    )


# ------------------------------------------------------------------------------------------ in the worker


class IntakeProcessError(RuntimeError):
    """An intake process died, failed, or gave no answer in time."""


class _Process:
    """One intake process and its courier thread, which sends it one chunk at a time and reads the answer.

    The process is ``python -m worker.stream.intake_pool``: a fresh interpreter that imports only what intake
    needs (not the worker's ``__main__``, which a multiprocessing child would import first), talking over a
    socket pair. Pickling and unpickling happen on the courier thread, not the loop thread.
    """

    def __init__(self, settings: Settings, views: dict[str, ModelView], name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[list[Item], cf.Future[ChunkAnswers]] | None] = (
            queue.SimpleQueue()
        )
        self.ready = threading.Event()
        self.dead: BaseException | None = None
        self._sent = 0  # chunks given to this process (counted by the loop thread)
        self._done = 0  # ... and answered or failed (counted by the courier)
        self._sent_records = 0  # records in those chunks
        self._done_records = 0
        ours, theirs = multiprocessing.Pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "worker.stream.intake_pool", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self._conn = ours
        self._thread = threading.Thread(target=self._courier, args=(settings, views), name=name, daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        """The process id."""
        return self._process.pid

    def submit(self, items: list[Item]) -> cf.Future[ChunkAnswers]:
        """Queue ``items`` for the process; the future fails if it died (or dies) before answering."""
        future: cf.Future[ChunkAnswers] = cf.Future()
        if self.dead is not None:
            future.set_exception(self.dead)
            return future
        self._sent += 1
        self._sent_records += len(items)
        size = len(items)
        future.add_done_callback(lambda _: self._answered(size))
        self._queue.put((items, future))
        return future

    def _answered(self, records: int) -> None:
        self._done_records += records
        self._done += 1

    @property
    def queued(self) -> int:
        """Chunks given to this process and not answered yet."""
        return self._sent - self._done

    @property
    def records_out(self) -> int:
        """Records in the chunks given to this process and not answered yet."""
        return self._sent_records - self._done_records

    def _courier(self, settings: Settings, views: dict[str, ModelView]) -> None:
        """Sends the chunks as they come (a process works on the next one while it waits for acks); a reader
        thread settles their futures from the answers, which come back in order."""
        sent: queue.SimpleQueue[cf.Future[ChunkAnswers] | None] = queue.SimpleQueue()
        reader: threading.Thread | None = None
        try:
            self._conn.send((settings, views))
            self._receive()
            reader = threading.Thread(
                target=self._read_answers, args=(sent,), name=f"{self._thread.name}-answers", daemon=True
            )
            reader.start()
            self.ready.set()
            while (job := self._queue.get()) is not None and self.dead is None:
                items, future = job
                if not future.set_running_or_notify_cancel():
                    continue
                sent.put(future)
                self._conn.send(items)
        except BaseException as exc:  # noqa: BLE001 — the process died or failed: every waiting chunk fails
            self._fail(exc)
        finally:
            sent.put(None)
            self._conn.close()  # the process reads EOF and exits; the reader's recv ends
            if reader is not None:
                reader.join(STOP_TIMEOUT_S)
            self._fail(IntakeProcessError("the intake process was stopped"))
            while True:  # chunks sent that the reader will not settle any more
                try:
                    left = sent.get_nowait()
                except queue.Empty:
                    break
                if left is not None and not left.done():
                    left.set_exception(self.dead)

    def _read_answers(self, sent: queue.SimpleQueue[cf.Future[ChunkAnswers] | None]) -> None:
        future: cf.Future[ChunkAnswers] | None = None
        try:
            while (future := sent.get()) is not None:
                answers = self._receive()
                if not future.done():
                    future.set_result(answers)
        except BaseException as exc:  # noqa: BLE001 — the process died or failed
            self._fail(exc)
            if future is not None and not future.done():
                future.set_exception(self.dead or exc)

    def _fail(self, exc: BaseException) -> None:
        """Mark the process dead (once) and fail every chunk still queued for it."""
        if self.dead is None:
            self.dead = (
                exc
                if isinstance(exc, IntakeProcessError)
                else IntakeProcessError(f"{type(exc).__name__}: {exc}")
            )
        while True:  # both threads may drain it: empty() then get_nowait() would race
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job[1].set_running_or_notify_cancel():
                job[1].set_exception(self.dead)

    def _receive(self) -> Any:
        status, value = self._conn.recv()
        if status != "ok":
            raise IntakeProcessError(value)
        return value

    def stop(self) -> None:
        """End the process and the courier; a chunk it is working on fails (its records are redone)."""
        self._queue.put(None)
        if self.queued:  # busy, or hung: its answer is not waited for
            self._process.kill()
        try:
            self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._thread.join(STOP_TIMEOUT_S)


class IntakePool:
    """The intake processes of one pipeline: started on the first burst, used while they pay (loop thread only)."""

    def __init__(self, settings: Settings, models: ModelRegistry, processes: int) -> None:
        self._settings = settings
        self._models = models
        self._processes = processes
        self._max_in_flight = settings.batching.max_in_flight
        self._workers: list[_Process] = []
        self._ready = False
        self._restarts = 0
        self._recent = 1.0  # recent fraction of records answered in a process (optimistic until measured)
        self._skipped = 0

    @property
    def ready_processes(self) -> int:
        """How many intake processes are ready (0 until started and initialized); loop thread only."""
        return len(self._workers) if self._is_ready(0) else 0

    @property
    def pids(self) -> list[int]:
        """Process ids of the intake processes (started or starting)."""
        return [worker.pid for worker in self._workers]

    @property
    def enabled(self) -> bool:
        """Whether chunks may go to processes at all (configured, and not given up on)."""
        return self._processes > 0 and self._restarts <= MAX_RESTARTS

    def wants(self, records: int) -> bool:
        """Whether a chunk of ``records`` should go to a process now (starts the pool on a burst)."""
        if not self.enabled or not self._is_ready(records):
            return False
        if self.busy:
            return False  # the processes are behind: this poll is faster on the loop thread than queued
        if sum(w.records_out for w in self._workers) + records > self._max_in_flight:
            return False  # queued records alone would pause the partitions (a re-fetch on confluent-kafka)
        if self._recent >= PAYS_ABOVE:
            return True
        self._skipped += 1  # few answered there lately: probe now and then
        if self._skipped >= PROBE_EVERY:
            self._skipped = 0
            return True
        return False

    def _is_ready(self, records: int) -> bool:
        if self._ready:
            return True
        if not self._workers:
            if records >= START_BURST:
                self._start()
            return False
        dead = next((w.dead for w in self._workers if w.dead is not None), None)
        if dead is not None:
            self._broken(f"an intake process failed to start ({dead})")
            return False
        if all(w.ready.is_set() for w in self._workers):
            self._ready = True
            log.info("intake processes ready", extra={"stage": "decode", "processes": len(self._workers)})
        return self._ready

    def _start(self) -> None:
        views = model_views(self._models)
        try:
            for i in range(self._processes):
                self._workers.append(_Process(self._settings, views, f"intake-courier-{i}"))
        except OSError as exc:
            self._broken(f"{type(exc).__name__}: {exc}")

    @property
    def busy(self) -> bool:
        """Whether every process has ``BUSY_CHUNKS`` out (the next poll is the loop thread's), without side effects."""
        return self._ready and all(w.queued >= BUSY_CHUNKS for w in self._workers)

    def answers_here(self) -> bool:
        """Whether a poll ``wants`` kept from the processes (they are busy) pays to answer the same way here, on
        the loop thread (``publish_chunk``: leaner than the staged path when most records are cache hits)."""
        return self.enabled and self._ready and self._recent >= PAYS_ABOVE

    def submit(self, items: list[Item]) -> cf.Future[ChunkAnswers]:
        """Send ``items`` to the least busy process (after ``wants`` said yes)."""
        return min(self._workers, key=lambda w: w.queued).submit(items)

    def learn(self, answered: int, records: int) -> None:
        """A chunk came back with ``answered`` of its ``records`` answered."""
        if records:
            self._recent += RECENT_WEIGHT * (answered / records - self._recent)

    def failed(self, exc: BaseException) -> None:
        """A chunk failed or timed out (a process died or hung): start again on the next burst."""
        self._broken(f"{type(exc).__name__}: {exc}")

    def _broken(self, reason: str) -> None:
        if not self._workers:
            return
        self._restarts += 1
        log.error(
            "intake processes failed (%s); their records take the loop thread's path%s",
            reason,
            "" if self.enabled else ", for good (too many restarts)",
            extra={"stage": "decode"},
        )
        self.close()

    def close(self) -> None:
        """Stop the processes (chunks still out fail: their records take the loop thread's path, or are redone)."""
        workers, self._workers, self._ready = self._workers, [], False
        for worker in workers:
            worker.stop()


def _serve(fd: int) -> None:
    """An intake process's loop: settings and model views first, then chunks until the worker hangs up."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        settings, views = conn.recv()
        _initialize(settings, views)
        conn.send(("ok", True))
        # One chunk at a time on one producer: send its verdicts, wait for their acks, answer, take the next.
        while True:
            items = conn.recv()
            try:
                answers = publish_chunk(items).finish()
            except Exception as exc:  # noqa: BLE001 — the worker redoes the chunk on its loop thread
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
            else:
                conn.send(("ok", answers))
    except (EOFError, OSError):
        return  # the worker closed its end (stopped, or died)
    finally:
        _close()


if __name__ == "__main__":
    # Run the importable module's loop, not this ``__main__`` copy: answers must pickle as
    # ``worker.stream.intake_pool`` classes, which the worker can load.
    from worker.stream.intake_pool import _serve as serve

    serve(int(sys.argv[1]))
