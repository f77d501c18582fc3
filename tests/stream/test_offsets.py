"""OffsetTracker: commit only the highest contiguous completed offset per partition."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.structs import TopicPartition

from worker.stream.offsets import OffsetTracker

TP0 = TopicPartition("events", 0)
TP1 = TopicPartition("events", 1)


def offsets_of(committable):
    return {tp: om.offset for tp, om in committable.items()}


def test_nothing_is_committable_before_completion():
    t = OffsetTracker()
    for o in range(3):
        t.register(TP0, o)
    assert t.committable() == {}
    assert t.in_flight() == 3


def test_in_order_completion_commits_next_offset():
    t = OffsetTracker()
    for o in range(3):
        t.register(TP0, o)
    t.complete(TP0, 0)
    t.complete(TP0, 1)
    assert offsets_of(t.committable()) == {TP0: 2}
    t.complete(TP0, 2)
    assert offsets_of(t.committable()) == {TP0: 3}
    assert t.in_flight() == 0


def test_out_of_order_completion_waits_for_the_gap():
    t = OffsetTracker()
    for o in range(5):
        t.register(TP0, o)
    for o in (4, 2, 3):
        t.complete(TP0, o)
    assert t.committable() == {}
    t.complete(TP0, 0)
    assert offsets_of(t.committable()) == {TP0: 1}
    t.complete(TP0, 1)
    assert offsets_of(t.committable()) == {TP0: 5}


def test_offset_number_gaps_do_not_block_progress():
    # compacted topics / transaction markers: consumed offsets need not be consecutive numbers
    t = OffsetTracker()
    for o in (10, 13, 20):
        t.register(TP0, o)
    t.complete(TP0, 13)
    t.complete(TP0, 10)
    assert offsets_of(t.committable()) == {TP0: 14}
    t.complete(TP0, 20)
    assert offsets_of(t.committable()) == {TP0: 21}


def test_partitions_are_independent():
    t = OffsetTracker()
    t.register(TP0, 0)
    t.register(TP1, 0)
    t.register(TP1, 1)
    t.complete(TP1, 0)
    t.complete(TP1, 1)
    assert offsets_of(t.committable()) == {TP1: 2}
    assert t.in_flight(TP0) == 1 and t.in_flight(TP1) == 0


def test_committed_offsets_are_not_offered_again():
    t = OffsetTracker()
    t.register(TP0, 0)
    t.complete(TP0, 0)
    offered = t.committable()
    t.mark_committed(offered)
    assert t.committable() == {}
    assert t.all_committed()
    t.register(TP0, 1)
    assert not t.all_committed()
    t.complete(TP0, 1)
    assert offsets_of(t.committable()) == {TP0: 2}


def test_duplicate_registration_and_completion_are_ignored():
    t = OffsetTracker()
    assert t.register(TP0, 0)
    assert not t.register(TP0, 0)
    assert t.register(TP0, 1)
    assert not t.register(TP0, 0)  # an older offset (re-fetch) is ignored
    assert t.complete(TP0, 1)
    assert not t.complete(TP0, 1)
    assert t.complete(TP0, 0)
    assert not t.complete(TP0, 0)  # already committable
    assert offsets_of(t.committable()) == {TP0: 2}
    assert not t.complete(TP0, 7)  # never consumed


def test_a_partition_that_left_is_dropped_with_its_late_completions():
    t = OffsetTracker()
    t.register(TP0, 0)
    t.register(TP1, 0)
    assert t.revoke([TP0], client_assignment=[TP1]) == {TP0}  # cooperative: the client already dropped it
    assert not t.owns(TP0)
    assert not t.complete(TP0, 0)
    t.complete(TP1, 0)
    assert offsets_of(t.committable()) == {TP1: 1}
    assert t.in_flight() == 0


def test_reassignment_after_leaving_starts_fresh_and_ignores_the_old_generation():
    t = OffsetTracker()
    t.register(TP0, 0)
    t.register(TP0, 1)
    old = t.generation(TP0)
    t.lose([TP0])
    t.assign([TP0])
    assert t.generation(TP0) != old
    # the client resumes from the committed offset, e.g. 1; offset 0 history is gone
    assert t.register(TP0, 1)
    assert not t.complete(TP0, 1, old)  # a late completion of the old generation
    assert t.complete(TP0, 1, t.generation(TP0))
    assert offsets_of(t.committable()) == {TP0: 2}


def test_eager_revoke_holds_partitions_until_the_assignment_says_which_are_kept():
    t = OffsetTracker()
    for tp in (TP0, TP1):
        t.register(tp, 0)
        t.register(tp, 1)
        t.complete(tp, 0)
    assert t.revoke([TP0, TP1], client_assignment=[TP0, TP1]) == set()  # eager: before the rejoin
    assert t.committable() == {}  # held partitions are not offered by the periodic commit
    assert offsets_of(t.committable([TP0, TP1])) == {TP0: 1, TP1: 1}  # the commit on revocation
    assert t.assign([TP0]) == {TP1}
    # TP0 is kept: its in-flight offset 1 is still pending and completes under the same generation
    assert t.in_flight(TP0) == 1
    assert t.complete(TP0, 1)
    assert offsets_of(t.committable()) == {TP0: 2}


def test_retain_drops_what_the_client_no_longer_holds():
    t = OffsetTracker()
    t.register(TP0, 0)
    t.register(TP1, 0)
    assert t.retain([TP1]) == {TP0}
    assert t.partitions == [TP1]


def test_committable_can_be_restricted_to_some_partitions():
    t = OffsetTracker()
    for tp in (TP0, TP1):
        t.register(tp, 0)
        t.complete(tp, 0)
    assert offsets_of(t.committable([TP1])) == {TP1: 1}


def _state(t: OffsetTracker, tp: TopicPartition):
    return t.in_flight(tp), offsets_of(t.committable([tp])), t.generation(tp)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["register", "complete"]),
            st.lists(st.integers(min_value=0, max_value=40), max_size=12),
            st.booleans(),  # a batch in ascending order, as a fetch gives it (else as drawn)
            st.booleans(),  # complete with the current generation (else a stale one)
        ),
        max_size=25,
    )
)
def test_batch_registration_and_completion_match_one_offset_at_a_time(steps) -> None:
    """register_many / complete_many give the same answers and leave the same state as per-offset calls,
    whether the batch is the oldest pending run (the fast path) or anything else."""
    one, many = OffsetTracker(), OffsetTracker()
    for kind, offsets, ascending, current in steps:
        if ascending:
            offsets = sorted(set(offsets))
        if kind == "register":
            expected = [i for i, o in enumerate(offsets) if one.register(TP0, o)]
            assert many.register_many(TP0, offsets) == expected
        else:
            generation = one.generation(TP0)
            if generation is not None and not current:
                generation -= 1
            expected = [i for i, o in enumerate(offsets) if one.complete(TP0, o, generation)]
            assert many.complete_many(TP0, offsets, generation) == expected
        assert _state(one, TP0) == _state(many, TP0)


def test_a_chunk_of_oldest_pending_offsets_completes_in_one_step() -> None:
    t = OffsetTracker()
    assert t.register_many(TP0, list(range(100, 110))) == list(range(10))
    assert t.register_many(TP0, list(range(105, 115))) == list(range(5, 10))  # re-fetched head ignored
    assert t.complete_many(TP0, list(range(100, 106))) == list(range(6))
    assert offsets_of(t.committable()) == {TP0: 106}
    assert t.complete_many(TP0, [106, 108]) == [0, 1]
    assert offsets_of(t.committable()) == {TP0: 107}
    assert t.in_flight(TP0) == 8


def test_caught_up_means_nothing_in_flight_and_something_to_commit():
    t = OffsetTracker()
    assert not t.caught_up()  # nothing consumed yet
    t.register(TP0, 0)
    t.register(TP1, 0)
    t.complete(TP0, 0)
    assert not t.caught_up()  # TP1's record is still in flight
    t.complete(TP1, 0)
    assert t.caught_up()
    t.mark_committed(t.committable())
    assert not t.caught_up()  # everything committed already
    t.register(TP0, 1)
    t.complete(TP0, 1)
    # Held mid-rebalance: not committed by the loop, so not a reason to commit.
    t.revoke([TP0], client_assignment=[TP0, TP1])
    assert not t.caught_up()


def test_a_checkpoint_commits_at_once_when_nothing_is_left_in_flight(monkeypatch):
    import worker.stream.checkpoint as checkpoint_module
    from worker.stream.checkpoint import CAUGHT_UP_COMMIT_S, COMMIT_INTERVAL_S, Checkpoint

    class Consumer:  # records the commits a real consumer would send
        def __init__(self):
            self.commits = []

        def commit(self, offsets):
            self.commits.append({tp: om.offset for tp, om in offsets.items()})

    now = [100.0]
    monkeypatch.setattr(checkpoint_module.time, "monotonic", lambda: now[0])
    consumer = Consumer()
    checkpoint = Checkpoint(consumer, settle=lambda _: None)
    checkpoint.commit_if_due()  # first turn: the interval's commit, nothing to commit yet
    checkpoint.tracker.register(TP0, 0)
    checkpoint.tracker.register(TP0, 1)
    checkpoint.tracker.complete(TP0, 0)
    now[0] += CAUGHT_UP_COMMIT_S + 1e-6
    checkpoint.commit_if_due()
    assert consumer.commits == []  # offset 1 is in flight: only the interval commits
    checkpoint.tracker.complete(TP0, 1)
    checkpoint.commit_if_due()
    assert consumer.commits == [{TP0: 2}]  # caught up: committed before the interval
    checkpoint.tracker.register(TP0, 2)
    checkpoint.tracker.complete(TP0, 2)
    assert checkpoint.seconds_until_due() == pytest.approx(CAUGHT_UP_COMMIT_S)  # what poll may wait
    checkpoint.commit_if_due()
    assert consumer.commits == [{TP0: 2}]  # at most every CAUGHT_UP_COMMIT_S
    now[0] += CAUGHT_UP_COMMIT_S + 1e-6
    checkpoint.commit_if_due()
    assert consumer.commits == [{TP0: 2}, {TP0: 3}]
    assert checkpoint.seconds_until_due() is None  # nothing left to commit
    checkpoint.tracker.register(TP0, 3)
    checkpoint.tracker.register(TP0, 4)
    checkpoint.tracker.complete(TP0, 3)
    now[0] += COMMIT_INTERVAL_S + 1e-6
    checkpoint.commit_if_due()
    assert consumer.commits[-1] == {TP0: 4}  # the interval commits with records in flight
