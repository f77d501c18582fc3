"""Offset tracking across rebalances, against a model of kafka-python 3's client state (hypothesis stateful).

The model client mirrors ``SubscriptionState.assign_from_subscribed``: a partition kept across an
assignment keeps its fetch position; a partition that enters it starts at the group's committed offset;
partitions pending revocation (the eager window between ``on_partitions_revoked`` and the new
assignment) are not fetched. The rebalance protocols call the listener the way
``kafka/coordinator/consumer.py`` does:

- eager: ``revoked(all)`` while the client still holds everything; later ``assign_from_subscribed(new)``
  then ``assigned(new)`` — with any pipeline activity (late results, acks, commits) in between;
- cooperative: ``assign_from_subscribed(new)``, then ``revoked(owned - new)``, then ``assigned(new - owned)``
  when non-empty;
- lost membership: ``lost(all)``, then the client drops everything.

Another group member (stateless) answers and commits partitions this consumer does not hold. Every
interleaving hypothesis draws must keep the one safety rule — a commit never passes an offset without an
acknowledged answer — and end, once everything is assigned back and run to completion, with every offset
answered and committed at the end offset.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from kafka.structs import TopicPartition

from worker.stream.offsets import OffsetTracker

PARTITIONS = [TopicPartition("events", p) for p in range(3)]
RECORDS = 4  # per partition
subsets = st.frozensets(st.sampled_from(PARTITIONS))


@dataclass
class Item:
    tp: TopicPartition
    offset: int
    generation: int | None
    published: bool = False


class Keeping:
    """What ``StreamPipeline``'s rebalance callbacks do with the tracker (the fix)."""

    def __init__(self) -> None:
        self.tracker = OffsetTracker()

    def revoked(self, revoked: set[TopicPartition], client: set[TopicPartition]) -> None:
        self.tracker.revoke(revoked, client)

    def lost(self, lost: set[TopicPartition]) -> None:
        self.tracker.lose(lost)

    def assigned(self, assigned: set[TopicPartition]) -> None:
        self.tracker.assign(assigned)

    def turn(self, client: set[TopicPartition]) -> None:
        self.tracker.retain(client)


class ForgetOnRevoke(Keeping):
    """The old policy: revocation forgets in-flight work, every assignment restarts tracking from scratch."""

    def revoked(self, revoked: set[TopicPartition], client: set[TopicPartition]) -> None:
        self.tracker.lose(revoked)

    def assigned(self, assigned: set[TopicPartition]) -> None:
        self.tracker.lose(assigned)
        self.tracker.assign(assigned)

    def turn(self, client: set[TopicPartition]) -> None:
        pass


class RebalanceModel(RuleBasedStateMachine):
    policy: type[Keeping] = Keeping

    def __init__(self) -> None:
        super().__init__()
        self.pipeline = self.policy()
        self.client: dict[TopicPartition, int] = {}  # assignment -> fetch position
        self.pending_revocation: set[TopicPartition] = set()
        self.committed = {tp: 0 for tp in PARTITIONS}
        self.answered: Counter[tuple[TopicPartition, int]] = Counter()
        self.items: list[Item] = []
        self.protocol = "eager"

    # -- the client ------------------------------------------------------------------------------------

    def assign_from_subscribed(self, new: set[TopicPartition]) -> None:
        self.client = {tp: self.client.get(tp, self.committed[tp]) for tp in new}
        self.pending_revocation = set()

    def commit(self, offsets: dict[TopicPartition, object]) -> None:
        for tp, om in offsets.items():
            offset = om.offset  # type: ignore[attr-defined]
            unanswered = [o for o in range(offset) if self.answered[(tp, o)] == 0]
            assert not unanswered, f"commit of {tp.partition}@{offset} passes unanswered offsets {unanswered}"
            self.committed[tp] = offset
        self.pipeline.tracker.mark_committed(offsets)  # type: ignore[arg-type]

    def stale(self, item: Item) -> bool:
        return self.pipeline.tracker.generation(item.tp) != item.generation

    # -- rules -----------------------------------------------------------------------------------------

    @initialize(protocol=st.sampled_from(["eager", "cooperative"]), first=subsets)
    def join(self, protocol: str, first: frozenset[TopicPartition]) -> None:
        self.protocol = protocol
        self.assign_from_subscribed(set(first))
        self.pipeline.assigned(set(first))

    @rule(tp=st.sampled_from(PARTITIONS))
    def fetch(self, tp: TopicPartition) -> None:
        position = self.client.get(tp)
        if position is None or tp in self.pending_revocation or position >= RECORDS:
            return
        self.client[tp] = position + 1
        if self.pipeline.tracker.register(tp, position):
            self.items.append(Item(tp, position, self.pipeline.tracker.generation(tp)))

    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        waiting = [i for i in self.items if not i.published]
        if not waiting:
            return
        item = data.draw(st.sampled_from(waiting))
        if self.stale(item):
            self.items.remove(item)  # the pipeline drops work of partitions that left
        else:
            item.published = True

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        published = [i for i in self.items if i.published]
        if not published:
            return
        item = data.draw(st.sampled_from(published))
        self.items.remove(item)
        self.answered[(item.tp, item.offset)] += 1  # a late answer is still an answer on the topic
        self.pipeline.tracker.complete(item.tp, item.offset, item.generation)

    @rule()
    def periodic_commit(self) -> None:
        self.commit(self.pipeline.tracker.committable())

    @rule()
    def turn(self) -> None:
        self.pipeline.turn(set(self.client))

    @precondition(lambda self: self.protocol == "eager" and not self.pending_revocation)
    @rule()
    def eager_revoke(self) -> None:
        revoked = set(self.client)
        if not revoked:
            return
        self.pending_revocation = set(revoked)
        self.commit(self.pipeline.tracker.committable(revoked))
        self.pipeline.revoked(revoked, set(self.client))

    @precondition(lambda self: self.protocol == "eager")
    @rule(new=subsets)
    def eager_assign(self, new: frozenset[TopicPartition]) -> None:
        if not self.pending_revocation and self.client:
            self.eager_revoke()
        self.assign_from_subscribed(set(new))
        self.pipeline.assigned(set(new))

    @precondition(lambda self: self.protocol == "cooperative")
    @rule(new=subsets)
    def cooperative_rebalance(self, new: frozenset[TopicPartition]) -> None:
        owned = set(self.client)
        self.assign_from_subscribed(set(new))
        revoked, added = owned - new, set(new) - owned
        if revoked:
            self.commit(self.pipeline.tracker.committable(revoked))
            self.pipeline.revoked(revoked, set(self.client))
        if added:
            self.pipeline.assigned(added)

    @rule()
    def lose_membership(self) -> None:
        lost = set(self.client)
        if lost:
            self.pipeline.lost(lost)
        self.assign_from_subscribed(set())

    @rule(tp=st.sampled_from(PARTITIONS))
    def other_member_answers(self, tp: TopicPartition) -> None:
        if tp in self.client or self.committed[tp] >= RECORDS:
            return
        self.answered[(tp, self.committed[tp])] += 1
        self.committed[tp] += 1

    def teardown(self) -> None:
        # Everything comes back to this consumer; run until nothing moves.
        everything = set(PARTITIONS)
        if self.protocol == "eager":
            self.eager_assign(frozenset(everything))
        else:
            self.cooperative_rebalance(frozenset(everything))
        for _ in range(RECORDS * len(PARTITIONS) * 4):
            for tp in PARTITIONS:
                self.fetch(tp)
            for item in list(self.items):
                if self.stale(item):
                    self.items.remove(item)
                    continue
                self.items.remove(item)
                self.answered[(item.tp, item.offset)] += 1
                self.pipeline.tracker.complete(item.tp, item.offset, item.generation)
            self.turn()
            self.periodic_commit()
        unanswered = [
            (tp.partition, o) for tp in PARTITIONS for o in range(RECORDS) if not self.answered[(tp, o)]
        ]
        assert unanswered == [], f"never answered: {unanswered}"
        assert self.committed == {tp: RECORDS for tp in PARTITIONS}, self.committed


MODEL_SETTINGS = settings(
    max_examples=400, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)


@pytest.mark.slow  # hundreds of generated cases: with the integration tests, not the unit run
def test_every_interleaving_commits_only_answered_offsets_and_ends_at_the_end_offset() -> None:
    run_state_machine_as_test(RebalanceModel, settings=MODEL_SETTINGS)


@pytest.mark.slow  # hundreds of generated cases: with the integration tests, not the unit run
def test_the_model_catches_the_forget_on_revoke_policy() -> None:
    """The model is able to fail: the old policy (forget on revoke, restart on assign) breaks it."""

    class OldPolicy(RebalanceModel):
        policy = ForgetOnRevoke

    with pytest.raises(AssertionError, match="passes unanswered|never answered"):
        # One failure is enough; several distinct ones would come as an ExceptionGroup.
        run_state_machine_as_test(OldPolicy, settings=settings(MODEL_SETTINGS, report_multiple_bugs=False))


@pytest.mark.parametrize("policy", [Keeping, ForgetOnRevoke])
def test_a_partition_kept_across_an_eager_rebalance_keeps_its_in_flight_offsets(
    policy: type[Keeping],
) -> None:
    """The reported sequence: work in flight on a kept partition, an eager rebalance, a later completion."""

    class Scenario(RebalanceModel):
        pass

    Scenario.policy = policy
    m = Scenario()
    tp = PARTITIONS[0]
    m.join("eager", frozenset({tp, PARTITIONS[1]}))
    m.fetch(tp)
    m.fetch(tp)  # offsets 0 and 1 in flight
    m.eager_revoke()
    m.assign_from_subscribed({tp})  # kept: the client keeps position 2
    m.pipeline.assigned({tp})
    m.fetch(tp)  # offset 2
    late = m.items[-1]
    late.published = True
    m.answered[(tp, 2)] += 1
    m.pipeline.tracker.complete(tp, 2, late.generation)
    m.items.remove(late)
    if policy is ForgetOnRevoke:
        with pytest.raises(AssertionError, match="passes unanswered offsets \\[0, 1\\]"):
            m.periodic_commit()
        return
    m.periodic_commit()
    assert m.committed[tp] == 0
    assert [i.offset for i in m.items] == [0, 1]
    assert not any(m.stale(i) for i in m.items)
