"""The in-memory broker behaves like kafka-python where the stream's logic tests rely on it.

The callback order of each rebalance protocol is kafka-python 3's (``kafka/coordinator/consumer.py``): eager
revokes everything while the client still holds it, then assigns the full new set (kept partitions keep their
fetch position); cooperative drops the leaving partitions first, then revokes only those and assigns only the
added ones; a lost membership drops everything before ``on_partitions_lost``.
"""

from __future__ import annotations

from kafka import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata, TopicPartition

from tests.support.local_broker import LocalBroker

T0, T1 = TopicPartition("t", 0), TopicPartition("t", 1)


class Recorder(ConsumerRebalanceListener):
    """Records each callback with the client's assignment at that moment."""

    def __init__(self, consumer) -> None:
        self.consumer = consumer
        self.calls: list[tuple[str, set, set]] = []

    def on_partitions_revoked(self, revoked) -> None:
        self.calls.append(("revoked", set(revoked), self.consumer.assignment()))

    def on_partitions_assigned(self, assigned) -> None:
        self.calls.append(("assigned", set(assigned), self.consumer.assignment()))

    def on_partitions_lost(self, lost) -> None:
        self.calls.append(("lost", set(lost), self.consumer.assignment()))


def joined(broker: LocalBroker):
    consumer = broker.consumer("g")
    listener = Recorder(consumer)
    consumer.subscribe(["t"], listener=listener)
    consumer.poll(0)
    listener.calls.clear()
    return consumer, listener


def broker_with_records() -> LocalBroker:
    broker = LocalBroker()
    broker.create_topic("t", 2)
    for i in range(3):
        broker.produce("t", b"v%d" % i, partition=0)
        broker.produce("t", b"w%d" % i, partition=1)
    return broker


def test_the_first_poll_joins_and_fetches_every_partition_from_the_start():
    broker = broker_with_records()
    consumer = broker.consumer("g")
    consumer.subscribe(["t"])
    records = consumer.poll(0)
    assert consumer.assignment() == {T0, T1}
    assert [r.offset for r in records[T0]] == [0, 1, 2] and [r.value for r in records[T1]] == [
        b"w0",
        b"w1",
        b"w2",
    ]


def test_eager_revokes_all_while_held_then_assigns_the_full_set_and_kept_partitions_keep_their_position():
    broker = broker_with_records()
    consumer, listener = joined(broker)
    broker.produce("t", b"v3", partition=0)
    broker.rebalance(consumer, [T0], protocol="eager")
    records = consumer.poll(0)
    assert listener.calls == [("revoked", {T0, T1}, {T0, T1}), ("assigned", {T0}, {T0})]
    assert [r.offset for r in records[T0]] == [3]  # not fetched again from the committed offset


def test_cooperative_drops_first_then_revokes_only_the_leaving_and_assigns_only_the_added():
    broker = broker_with_records()
    consumer, listener = joined(broker)
    broker.rebalance(consumer, [T1], protocol="cooperative")
    consumer.poll(0)
    assert listener.calls == [("revoked", {T0}, {T1}), ("assigned", set(), {T1})]


def test_a_lost_membership_drops_everything_before_the_callback():
    broker = broker_with_records()
    consumer, listener = joined(broker)
    broker.rebalance(consumer, [], protocol="lost")
    consumer.poll(0)
    assert listener.calls[0] == ("lost", {T0, T1}, set())


def test_a_partition_assigned_again_starts_at_the_committed_offset():
    broker = broker_with_records()
    consumer, _ = joined(broker)
    consumer.commit({T1: OffsetAndMetadata(2, "", -1)})
    broker.rebalance(consumer, [T0], protocol="cooperative")
    consumer.poll(0)
    broker.rebalance(consumer, [T0, T1], protocol="cooperative")
    assert [r.offset for r in consumer.poll(0)[T1]] == [2]
    assert broker.committed("g", T1) == 2 and broker.commits[-1].offsets == {T1: 2}


def test_paused_partitions_are_not_fetched_and_held_acks_are_not_in_the_topic_until_released():
    broker = broker_with_records()
    consumer, _ = joined(broker)
    broker.produce("t", b"v3", partition=0)
    consumer.pause(T0)
    assert consumer.poll(0) == {} and consumer.paused() == {T0}
    producer = broker.producer()
    broker.hold_acks()
    future = producer.send("out", value=b"x", key=b"k")
    assert not future.is_done and broker.records("out") == []
    broker.release_acks()
    assert future.succeeded() and [r.value for r in broker.records("out")] == [b"x"]
    broker.fail_sends(1)
    assert producer.send("out", value=b"y").failed()
