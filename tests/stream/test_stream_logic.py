"""The stream's delivery rules on the in-memory broker: each test runs the real ``StreamPipeline`` loop for
a few milliseconds with ``LocalBroker``, ``DictCache`` and ``FakeEngine`` (``tests.support``): a text with
``kill`` is unsafe, ``POISON`` fails its forward pass, ``GARBLED`` gets an answer that does not parse.

The same rules are exercised end to end against tansu, Redis and the tiny checkpoints in the integration
tests beside this file; here every failure and rebalance lands exactly between two loop turns.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from tests.support.contracts import validate_dead_letter, validate_verdict
from tests.support.fake_engine import DictCache, FakeEngine
from tests.support.local_broker import LocalClients
from tests.support.local_stream import LocalStream, chat_event, local_settings
from worker.cache.published import DIGEST_BYTES
from worker.engine.registry import ModelRegistry
from worker.stream.pipeline import StreamPipeline


def engine_outage(s: LocalStream) -> dict | None:
    """The engine outage ``status()`` reports (None when the engine is not down)."""
    return (s.pipeline.status().outage or {}).get("engine")


@pytest.fixture
def stream():
    """An open two-partition local stream, closed after the test."""
    opened: list[LocalStream] = []

    def make(partitions: int = 2, **overrides) -> LocalStream:
        s = LocalStream(partitions, **overrides).open()
        opened.append(s)
        return s

    yield make
    for s in opened:
        if s.pipeline._running:
            s.pipeline.close()


def test_every_event_gets_one_verdict_or_dead_letter_and_every_offset_is_committed(stream):
    s = stream()
    events = [chat_event(i, f"how to kill, text {i}" if i % 3 == 0 else None) for i in range(10)]
    s.send([*events, b"{not json"])
    s.turn_until(s.all_committed, "all committed")
    verdicts, dead = s.verdicts(), s.dead_letters()
    assert sorted(v["event_id"] for v in verdicts) == sorted(e["event_id"] for e in events)
    assert [d["reason"] for d in dead] == ["invalid_json"]
    for v in verdicts:
        validate_verdict(v)
    for d in dead:
        validate_dead_letter(d)
    flagged = s.broker.values(s.topics.flagged)
    assert sorted(f["event_id"] for f in flagged) == [f"ev-{i}" for i in (0, 3, 6, 9)]
    assert s.pipeline.status().all_committed is True


def test_an_offset_is_committed_only_after_its_answer_is_acknowledged(stream):
    s = stream()
    s.broker.hold_acks()
    s.send([chat_event(i) for i in range(6)])
    s.turn_until(lambda: s.broker.unacknowledged == 6, "six answers sent")
    s.turn(20)
    assert s.committed() == {0: None, 1: None}  # sent, not acknowledged: nothing committed
    assert s.pipeline.status().in_flight == 6
    s.broker.release_acks()
    s.turn_until(s.all_committed, "committed after the acks")
    assert s.committed() == {0: 3, 1: 3}
    assert all(not c.asynchronous for c in s.broker.commits)  # the interval commits synchronously


def test_commit_point_waits_for_the_slowest_earlier_answer_of_its_partition(stream):
    s = stream(partitions=1)
    s.send([chat_event(0, "POISON first")])  # its batch fails, is isolated, dead-lettered: later than 1..3
    s.send([chat_event(i) for i in range(1, 4)], partition=0)
    s.turn_until(s.all_committed, "all committed")
    assert s.committed() == {0: 4}
    assert [d["event_id"] for d in s.dead_letters()] == ["ev-0"]


def test_a_failed_delivery_is_published_again_and_committed_once_acknowledged(stream):
    s = stream()
    s.broker.fail_sends(2)
    s.send([chat_event(i) for i in range(4)])
    s.turn_until(s.all_committed, "all committed")
    assert Counter(v["event_id"] for v in s.verdicts()) == {f"ev-{i}": 1 for i in range(4)}
    assert s.pipeline.counters["republished"] == 2
    assert s.pipeline.status().outage is None


def test_a_send_that_raises_is_published_again(stream):
    s = stream()
    s.broker.refuse_sends(3)
    s.send([chat_event(i) for i in range(4)])
    s.turn_until(s.all_committed, "all committed")
    assert sorted(v["event_id"] for v in s.verdicts()) == [f"ev-{i}" for i in range(4)]
    assert s.pipeline.counters["republished"] == 3


def test_deliveries_failing_again_and_again_are_an_outage_that_pauses_and_recovers(stream):
    s = stream(failures__max_publish_attempts=2)
    s.broker.fail_sends(10_000)
    s.send([chat_event(i) for i in range(4)])
    s.turn_until(lambda: "delivery" in (s.pipeline.status().outage or {}), "delivery outage")
    status = s.pipeline.status()
    assert status.ready is False and status.reason == "delivery_outage"
    s.turn(5)
    assert s.consumer.paused() == s.consumer.assignment() != set()
    assert s.committed() == {0: None, 1: None} and s.verdicts() == []
    s.broker.fail_sends(0)  # the broker accepts records again
    s.turn_until(s.all_committed, "delivered after the outage")
    s.turn_until(lambda: not s.consumer.paused(), "resumed")
    assert s.pipeline.status().outage is None and s.pipeline.ready
    assert sorted(v["event_id"] for v in s.verdicts()) == [f"ev-{i}" for i in range(4)]  # none dropped


def test_backpressure_pauses_above_the_bound_and_resumes_below_the_low_mark(stream):
    s = stream(max_poll_records=3, batching__max_in_flight=4, batching__resume_below=2)
    s.broker.hold_acks()
    s.send([chat_event(i) for i in range(20)])
    s.turn_until(lambda: bool(s.consumer.paused()), "paused")
    assert s.consumer.paused() == s.consumer.assignment()
    s.turn(10)
    in_flight = s.pipeline.status().in_flight
    assert 4 < in_flight <= 4 + 2 * 3  # a poll per partition above the bound, then nothing more is fetched
    s.broker.release_acks()
    s.turn_until(lambda: not s.consumer.paused(), "resumed below the low mark")
    s.turn_until(lambda: s.broker.release_acks() >= 0 and s.all_committed(), "all committed")
    assert len(s.verdicts()) == 20


def test_a_consumer_whose_pause_drops_its_prefetch_holds_back_first_and_pauses_only_when_that_lasts(
    stream, monkeypatch
):
    from worker.stream import partitions

    monkeypatch.setattr(partitions, "HOLD_BACK_S", 3600.0)  # a hold that never lasts too long, first
    s = stream(max_poll_records=3, purges_on_pause=True, batching__max_in_flight=4, batching__resume_below=2)
    s.broker.hold_acks()
    s.send([chat_event(i) for i in range(20)])
    s.turn_until(lambda: s.pipeline.partitions.holding, "holding back")
    consumed = s.pipeline.counters["consumed"]
    s.turn(10)
    assert s.pipeline.counters["consumed"] == consumed, "nothing is taken while holding back"
    assert not s.consumer.paused(), "nothing paused: the prefetch is kept"
    assert s.pipeline.status().paused == len(s.consumer.assignment()), "held partitions are reported paused"
    s.broker.release_acks()
    s.turn_until(lambda: not s.pipeline.partitions.holding, "taking records again below the low mark")
    assert not s.consumer.paused()
    s.broker.hold_acks()
    s.turn_until(lambda: s.pipeline.partitions.holding, "holding back again")
    monkeypatch.setattr(partitions, "HOLD_BACK_S", 0.0)  # the hold lasts too long: pause after all
    s.turn_until(lambda: bool(s.consumer.paused()), "paused")
    assert not s.pipeline.partitions.holding
    s.broker.release_acks()
    s.turn_until(lambda: s.broker.release_acks() >= 0 and s.all_committed(), "all committed")
    assert not s.consumer.paused() and not s.pipeline.partitions.holding
    assert sorted(v["event_id"] for v in s.verdicts()) == sorted(f"ev-{i}" for i in range(20))


def test_a_partition_kept_across_an_eager_rebalance_keeps_its_work_and_a_revoked_one_is_dropped(stream):
    s = stream()
    s.turn()  # join: both partitions
    s.broker.hold_acks()
    s.send([chat_event(i) for i in range(8)])
    s.turn_until(lambda: s.broker.unacknowledged == 8, "answers sent")
    s.broker.rebalance(s.consumer, [s.tp(0)], protocol="eager")
    s.turn()
    assert s.consumer.assignment() == {s.tp(0)}
    assert s.pipeline.status().assigned == (f"{s.topics.events}-0",)
    completed_before = s.pipeline.counters["completed"]
    s.broker.release_acks()  # the acks of partition 1's answers arrive after it left: not counted
    s.turn_until(lambda: s.committed()[0] == 4, "kept partition committed")
    s.turn(5)
    assert s.committed()[1] is None  # the next owner of partition 1 starts at its committed offset
    assert s.pipeline.counters["completed"] - completed_before == 4
    assert s.pipeline.status().in_flight == 0


def test_nothing_is_published_while_an_eager_rebalance_waits_for_its_assignment(stream):
    s = stream(batching__max_wait_ms=200, batching__max_size=64)
    s.turn()  # join: both partitions
    s.send([chat_event(i) for i in range(8)])  # four per partition
    s.turn()  # polled and batched: the batch is due in 200 ms
    assert s.pipeline.status().in_flight == 8 and not s.verdicts()
    s.broker.rebalance(s.consumer, [s.tp(0)], protocol="eager", rejoin_s=0.6)
    s.turn()  # the revoke; the join completes 0.6 s later
    until = time.monotonic() + 0.5
    while time.monotonic() < until:  # the batch falls due in the gap
        s.turn()
    assert not s.verdicts(), "an answer for partition 1 now would duplicate its next owner's"
    s.turn_until(lambda: s.consumer.assignment() == {s.tp(0)}, "the new assignment")
    s.turn_until(lambda: s.committed()[0] == 4, "kept partition answered and committed")
    s.turn(5)
    assert sorted(v["source"]["partition"] for v in s.verdicts()) == [0] * 4, (
        "partition 1's work left with it"
    )
    assert s.committed()[1] is None and s.pipeline.status().in_flight == 0


def test_a_cooperative_rebalance_leaves_kept_partitions_untouched(stream):
    s = stream()
    s.turn()
    s.broker.hold_acks()
    s.send([chat_event(i) for i in range(8)])
    s.turn_until(lambda: s.broker.unacknowledged == 8, "answers sent")
    s.broker.rebalance(s.consumer, [s.tp(1)], protocol="cooperative")
    s.turn()
    s.broker.release_acks()
    s.turn_until(lambda: s.committed()[1] == 4, "kept partition committed")
    assert s.committed()[0] is None
    assert s.pipeline.counters["completed"] == 4


def test_work_of_a_partition_revoked_while_batched_is_dropped_not_answered(stream):
    s = stream(batching__max_wait_ms=60_000, batching__max_size=64)  # items wait in the batcher
    s.turn()
    s.send([chat_event(i) for i in range(8)])
    s.turn_until(lambda: s.pipeline.counters["consumed"] == 8, "consumed")
    s.broker.rebalance(s.consumer, [s.tp(0)], protocol="cooperative")
    s.turn()
    assert s.pipeline.counters["dropped_revoked"] == 4
    s.drain_and_close()  # the drain flushes the batcher: only partition 0's events are judged
    assert sorted(v["event_id"] for v in s.verdicts()) == [f"ev-{i}" for i in (0, 2, 4, 6)]
    assert s.committed() == {0: 4, 1: None}


def test_a_lost_membership_forgets_everything_and_commits_nothing_for_it(stream):
    s = stream()
    s.turn()
    s.broker.hold_acks()
    s.send([chat_event(i) for i in range(4)])
    s.turn_until(lambda: s.broker.unacknowledged == 4, "answers sent")
    commits_before = len(s.broker.commits)
    s.broker.rebalance(s.consumer, [], protocol="lost")
    s.turn()
    s.broker.release_acks()
    s.turn(10)
    assert len(s.broker.commits) == commits_before
    assert s.pipeline.counters["completed"] == 0
    assert s.pipeline.status().assigned == ()


def test_the_revoke_commits_what_is_complete_before_the_partitions_leave(stream):
    s = stream()
    s.send([chat_event(i) for i in range(4)])
    s.turn_until(lambda: s.pipeline.counters["completed"] == 4, "answered")
    s.broker.fail_commits(10_000)  # the interval's commits fail: only the revoke's may land
    s.turn(3)
    s.broker.fail_commits(0)
    s.broker.rebalance(s.consumer, [], protocol="cooperative")
    s.turn()
    assert s.committed() == {0: 2, 1: 2}
    assert s.broker.commits[-1].asynchronous  # a blocking commit raises inside kafka-python's callback


class SlowMarkerCache(DictCache):
    """Marker writes take a while (a loaded Redis, a busy machine)."""

    def set_raw(self, items, ttl_s):
        time.sleep(0.3)
        super().set_raw(items, ttl_s)

    def set_ranges(self, items, ttl_s):
        time.sleep(0.3)
        super().set_ranges(items, ttl_s)


def test_a_revoke_hands_partitions_over_only_after_their_published_markers_are_written(stream):
    """The next owner reads the markers when it takes a partition: the revoke must not leave them on the writer thread."""
    cache = SlowMarkerCache()
    s = stream(cache=cache)
    s.turn()  # join: both partitions
    s.broker.fail_commits(10_000)  # no interval commit lands: the next owner would replay everything
    s.send([chat_event(i) for i in range(6)])
    s.turn_until(lambda: s.pipeline.counters["completed"] == 6, "answered and acknowledged")
    s.broker.rebalance(s.consumer, [], protocol="cooperative")
    s.turn()  # the revoke
    assert s.pipeline.status().assigned == ()
    blocks = [v for k, v in cache.raw.items() if ":pub:" in k and not k.endswith(":high")]
    slots = [b[i : i + DIGEST_BYTES] for b in blocks for i in range(0, len(b), DIGEST_BYTES)]
    assert sum(slot != bytes(DIGEST_BYTES) for slot in slots) == 6, sorted(cache.raw)


def test_a_poison_item_is_isolated_into_one_dead_letter(stream):
    s = stream(partitions=1, batching__max_size=8, batching__max_wait_ms=50)
    events = [chat_event(i, "POISON here" if i == 5 else None) for i in range(8)]
    s.send(events)
    s.turn_until(s.all_committed, "all committed")
    dead = s.dead_letters()
    assert [(d["event_id"], d["reason"]) for d in dead] == [("ev-5", "engine_error")]
    assert sorted(v["event_id"] for v in s.verdicts()) == sorted(f"ev-{i}" for i in range(8) if i != 5)
    assert s.pipeline.counters["isolations"] >= 1 and s.pipeline.counters["outages"] == 0


def test_an_unparseable_answer_is_a_dead_letter_without_bisection(stream):
    s = stream(partitions=1)
    s.send([chat_event(0, "GARBLED words"), chat_event(1)])
    s.turn_until(s.all_committed, "all committed")
    assert [(d["event_id"], d["reason"]) for d in s.dead_letters()] == [("ev-0", "engine_error")]
    assert s.pipeline.counters["isolations"] == 0


def test_an_engine_outage_holds_the_batch_pauses_and_judges_it_after_recovery(stream):
    s = stream(partitions=1)
    s.engine.broken = True
    s.send([chat_event(i) for i in range(4)])
    s.turn_until(lambda: engine_outage(s) and engine_outage(s)["failed_retries"] >= 2, "retries")
    status = s.pipeline.status()
    assert status.reason == "engine_outage" and status.ready is False
    assert s.consumer.paused() == s.consumer.assignment()
    assert s.dead_letters() == [] and s.verdicts() == [] and s.committed() == {0: None}
    s.engine.broken = False
    s.turn_until(s.all_committed, "judged after recovery")
    assert sorted(v["event_id"] for v in s.verdicts()) == [f"ev-{i}" for i in range(4)]
    assert s.dead_letters() == [] and s.pipeline.status().outage is None


def test_failed_batches_in_a_row_are_an_outage_even_when_the_probe_works(stream):
    s = stream(partitions=1, batching__max_size=2, failures__max_failed_batches=2)
    s.send([chat_event(i, f"POISON {i}") for i in range(6)])
    s.turn_until(lambda: engine_outage(s), "engine outage")
    assert len(s.dead_letters()) == 2  # the first failed batch was taken for poison


def test_shutdown_drains_in_flight_work_and_commits_it(stream):
    s = stream(batching__max_wait_ms=60_000)
    s.send([chat_event(i) for i in range(6)])
    s.turn_until(lambda: s.pipeline.counters["consumed"] == 6, "consumed")
    assert s.verdicts() == []
    s.drain_and_close()
    assert s.all_committed() and len(s.verdicts()) == 6
    assert s.consumer.closed and s.cache.closed


def test_a_replayed_record_whose_answer_was_acknowledged_is_not_published_again(stream):
    first = stream()
    first.send([chat_event(i) for i in range(6)])
    first.turn_until(first.all_committed, "first run")
    first.drain_and_close()
    for p in range(2):  # what a successor finds after a crash that left the answers uncommitted
        first.broker._committed.pop((first.group, first.tp(p)))
    second = stream(broker=first.broker, cache=first.cache)
    second.turn_until(second.all_committed, "replayed")
    assert len(second.verdicts()) == 6  # nothing published again
    assert second.pipeline.counters["replays_skipped"] == 6


def test_identical_content_is_classified_once_and_cache_hits_skip_the_model(stream):
    s = stream(partitions=1)
    s.send([chat_event(i, "the same question") for i in range(5)])
    s.turn_until(s.all_committed, "all committed")
    assert sum(s.engine.forward_passes) == 1
    s.send([chat_event(i, "the same question", prefix="again") for i in range(3)])
    s.turn_until(s.all_committed, "all committed again")
    assert sum(s.engine.forward_passes) == 1 and s.pipeline.counters["cached"] == 3


def test_a_stop_requested_while_the_models_load_never_joins_the_group(monkeypatch):
    """A worker told to stop while it is still starting holds nothing: it must not join, take or commit."""
    settings = local_settings()
    loading, release = threading.Event(), threading.Event()

    def slow_load(cls, settings_, names=None):
        loading.set()
        assert release.wait(10), "the test never released the model load"
        return ModelRegistry.of(FakeEngine(settings_), settings_)

    monkeypatch.setattr(ModelRegistry, "from_settings", classmethod(slow_load))
    s = LocalStream(2)  # only for its broker, topic and events; its own pipeline is never opened
    s.send([chat_event(i) for i in range(4)])
    clients = LocalClients(s.broker, group=s.group)
    pipeline = StreamPipeline(settings, worker_name="late", cache=DictCache(), clients=clients)
    runner = threading.Thread(target=pipeline.run, daemon=True)
    runner.start()
    assert loading.wait(10)
    assert pipeline.request_stop() is False  # not in the group yet: nothing to drain
    release.set()
    runner.join(10)
    assert not runner.is_alive()
    (consumer,) = [c for c in clients.made if hasattr(c, "subscribe")]
    assert consumer.polls == 0 and consumer.closed and not consumer._topics
    assert s.committed() == {0: None, 1: None}
    assert s.broker.values(s.topics.verdicts) == []
    assert pipeline.request_stop() is False  # idempotent


def test_a_stop_after_joining_reports_it_and_drains(stream):
    s = stream()
    s.send([chat_event(i) for i in range(4)])
    s.turn_until(s.all_committed, "all committed")
    assert s.pipeline.request_stop() is True
    s.pipeline.drain()
    s.pipeline.close()
    assert len(s.verdicts()) == 4
