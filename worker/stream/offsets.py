"""Which offsets may be committed: the highest contiguous completed offset per partition, across rebalances.

The rule Quix Streams and arroyo follow: an offset is committable only when it and every offset
consumed before it on the same partition are *completed* (their verdict or dead letter was
acknowledged by the broker). Completion may arrive out of order; the commit point only moves over a
contiguous run of completed offsets, in the order they were consumed (so gaps in the offset numbers,
e.g. from compaction or transaction markers, never block progress).

Rebalances: tracking state lives exactly as long as the Kafka client's own state for the partition.
kafka-python 3 (``SubscriptionState.assign_from_subscribed``) keeps the fetch position, the paused flag
and the fetch buffers of every partition present in both the old and the new assignment, and gives a
partition that enters the assignment a fresh state whose position is the group's committed offset. So:

- a partition the consumer *keeps* keeps its in-flight work and its commit point: its fetch position is
  past those offsets and nothing will read them again, so dropping them would lose them for good, and
  a later completion would move the commit point over the hole. Their results stay valid: no other
  member owned the partition in between.
- a partition that *leaves* the client's assignment (revoked for good, or lost) is forgotten: its next
  owner — or this consumer, if it comes back — starts from the committed offset, which never passed
  an unanswered offset. Late completions of its old work carry an old *generation* and are ignored.

The confluent-kafka adapters (``worker.stream.confluent_clients``) reproduce exactly these semantics.

Keeping is exact under both protocols kafka-python implements, where "rewind retained partitions to
the committed offset" is not: under the cooperative protocol (``cooperative-sticky``) a retained
partition gets no callback at all, so there is nothing to rewind on, and under the eager protocol a
rewind would re-read and answer twice everything in flight. What differs is *when* a partition leaves:

- eager: ``on_partitions_revoked(all)`` runs *before* the rejoin, while the client still holds every
  partition; which ones are kept is known only at ``on_partitions_assigned(full new assignment)``.
  ``revoke`` therefore only *holds* partitions still in the client's assignment (no commits offered
  for them), and ``assign`` drops the held ones that are not in the new assignment. While any is held
  (``rejoining``: the join can take several polls) the pipeline publishes nothing, since an answer for a
  partition that then moves would duplicate its next owner's.
- cooperative: ``on_partitions_revoked(lost ones)`` runs *after* the client dropped them, and
  ``on_partitions_assigned`` names only the added ones. ``revoke`` drops what the client no longer
  holds; retained partitions are never touched.
- lost membership (``on_partitions_lost``): the client drops everything right after: ``lose``.

``retain(client_assignment)`` drops whatever the client no longer holds, as a per-turn safety net.

Pure bookkeeping: no Kafka calls. The pipeline registers, completes, commits and forwards rebalances.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice

from kafka.structs import OffsetAndMetadata, TopicPartition


@dataclass
class _PartitionState:
    """Offsets consumed but not yet committable, in consumption order."""

    generation: int
    pending: deque[int] = field(default_factory=deque)
    completed: set[int] = field(default_factory=set)
    highest_registered: int = -1
    next_offset: int | None = None  # the offset to commit (last contiguous completed + 1)
    committed: int | None = None  # what was last committed (acknowledged by the group coordinator)
    held: bool = False  # revoked while the client still holds it (eager): kept or dropped at the next assign

    @property
    def uncommitted(self) -> bool:
        """Whether the commit point moved past the last commit (there is something to commit)."""
        return self.next_offset is not None and (self.committed is None or self.next_offset > self.committed)


class OffsetTracker:
    """Per-partition record of consumed and completed offsets; yields what may be committed."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionState] = {}
        self._generations = 0

    def _fresh(self, tp: TopicPartition) -> _PartitionState:
        self._generations += 1
        state = self._partitions[tp] = _PartitionState(self._generations)
        return state

    # -- rebalance ------------------------------------------------------------------------------------

    @property
    def rejoining(self) -> bool:
        """An eager rebalance is under way: partitions are revoked but held until the new assignment."""
        return any(state.held for state in self._partitions.values())

    def assign(self, assigned: Iterable[TopicPartition]) -> set[TopicPartition]:
        """``on_partitions_assigned``: track new partitions; resolve held ones. Returns the dropped ones.

        A held partition in ``assigned`` is kept with its in-flight work (the client kept its position);
        a held partition not in it is dropped; an untracked one starts fresh with a new generation.
        """
        assigned = set(assigned)
        for tp in assigned:
            state = self._partitions.get(tp)
            if state is None:
                self._fresh(tp)
            else:
                state.held = False
        return self._drop([tp for tp, s in self._partitions.items() if s.held and tp not in assigned])

    def revoke(
        self, revoked: Iterable[TopicPartition], client_assignment: Iterable[TopicPartition]
    ) -> set[TopicPartition]:
        """``on_partitions_revoked``: hold what the client still holds, drop the rest. Returns the dropped ones.

        ``client_assignment``: the consumer's assignment at the time of the callback (eager: still the old
        one; cooperative: already the new one).
        """
        still = set(client_assignment)
        gone = []
        for tp in revoked:
            state = self._partitions.get(tp)
            if state is None:
                continue
            if tp in still:
                state.held = True
            else:
                gone.append(tp)
        return self._drop(gone)

    def lose(self, lost: Iterable[TopicPartition]) -> set[TopicPartition]:
        """``on_partitions_lost``: forget ``lost`` now (the client resets them). Returns the dropped ones."""
        return self._drop(lost)

    def retain(self, client_assignment: Iterable[TopicPartition]) -> set[TopicPartition]:
        """Drop every partition the client no longer holds (its state there is gone). Returns the dropped ones."""
        keep = set(client_assignment)
        return self._drop([tp for tp in self._partitions if tp not in keep])

    def _drop(self, tps: Iterable[TopicPartition]) -> set[TopicPartition]:
        dropped = set()
        for tp in tps:
            if self._partitions.pop(tp, None) is not None:
                dropped.add(tp)
        return dropped

    def owns(self, tp: TopicPartition) -> bool:
        """Whether ``tp`` is currently tracked (assigned, possibly held during an eager rebalance)."""
        return tp in self._partitions

    def generation(self, tp: TopicPartition) -> int | None:
        """The tracking generation of ``tp`` (new each time it is tracked afresh), None when untracked."""
        state = self._partitions.get(tp)
        return state.generation if state is not None else None

    @property
    def partitions(self) -> list[TopicPartition]:
        """The tracked partitions."""
        return list(self._partitions)

    # -- offsets --------------------------------------------------------------------------------------

    def register(self, tp: TopicPartition, offset: int) -> bool:
        """Record ``offset`` as consumed. Returns False (and ignores it) for a duplicate or an old offset.

        An untracked partition is tracked implicitly (records can arrive before the assignment callback
        when partitions are assigned manually).
        """
        state = self._partitions.get(tp)
        if state is None:
            state = self._fresh(tp)
        if offset <= state.highest_registered:
            return False
        state.highest_registered = offset
        state.pending.append(offset)
        return True

    def register_many(self, tp: TopicPartition, offsets: Sequence[int]) -> list[int]:
        """``register`` of each of ``offsets`` in turn: the indices of those registered (the others are ignored).

        A partition's records from one fetch come in ascending offset order: then this is a few C-level steps
        for the whole batch, not a Python step per offset (a wave of cache hits registers thousands a second).
        """
        if not offsets:
            return []
        state = self._partitions.get(tp)
        if state is None:
            state = self._fresh(tp)
        if not _ascending(offsets):
            return [i for i, offset in enumerate(offsets) if self.register(tp, offset)]
        skip = 0
        if offsets[0] <= state.highest_registered:  # re-fetched after a seek: the head is in flight already
            skip = next((i for i, o in enumerate(offsets) if o > state.highest_registered), len(offsets))
            if skip == len(offsets):
                return []
        state.pending.extend(islice(offsets, skip, None))
        state.highest_registered = offsets[-1]
        return list(range(skip, len(offsets)))

    def complete(self, tp: TopicPartition, offset: int, generation: int | None = None) -> bool:
        """Mark ``offset`` as done. Returns False (ignored) if it is not pending in this generation of ``tp``.

        ``generation``: the one ``offset`` was registered under; a completion from an older generation
        (the partition left and came back) must not touch the new one's offsets.
        """
        state = self._partitions.get(tp)
        if state is None or (generation is not None and generation != state.generation):
            return False
        if offset > state.highest_registered or offset in state.completed:
            return False
        if not state.pending or offset < state.pending[0]:
            return False
        state.completed.add(offset)
        # Advance over the contiguous completed prefix now, so committable() stays cheap.
        while state.pending and state.pending[0] in state.completed:
            done = state.pending.popleft()
            state.completed.discard(done)
            state.next_offset = done + 1
        return True

    def complete_many(
        self, tp: TopicPartition, offsets: Sequence[int], generation: int | None = None
    ) -> list[int]:
        """``complete`` of each of ``offsets`` in turn: the indices of those completed (the others are ignored).

        A chunk of a poll's records answered at once (ascending, none completed before) takes a few C-level steps
        instead of a Python step per offset: when it is the oldest pending run its offsets are popped (and the
        completed ones right behind it with them), and when it waits behind older ones it joins the completed set.
        """
        state = self._partitions.get(tp)
        if state is None or (generation is not None and generation != state.generation) or not offsets:
            return []
        pending, completed = state.pending, state.completed
        count = len(offsets)
        if (
            pending
            and offsets[-1] <= state.highest_registered
            and _ascending(offsets)
            and (not completed or completed.isdisjoint(offsets))
        ):
            if offsets[0] > pending[0]:  # behind older offsets still pending: completed, not committable yet
                completed.update(offsets)
                return list(range(count))
            if len(pending) >= count and list(islice(pending, count)) == list(offsets):  # the oldest run
                popleft = pending.popleft
                for _ in range(count):
                    popleft()
                state.next_offset = offsets[-1] + 1
                while pending and pending[0] in completed:
                    done = popleft()
                    completed.discard(done)
                    state.next_offset = done + 1
                return list(range(count))
        return [i for i, offset in enumerate(offsets) if self.complete(tp, offset, generation)]

    def committable(
        self, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """``{tp: OffsetAndMetadata(next_offset)}`` for partitions whose commit point moved past the last commit.

        Without ``partitions``: every tracked partition except held ones (mid-rebalance, maybe not ours
        any more). With ``partitions``: exactly those (the commit made on revocation).
        """
        result: dict[TopicPartition, OffsetAndMetadata] = {}
        explicit = partitions is not None
        for tp in list(partitions) if partitions is not None else list(self._partitions):
            state = self._partitions.get(tp)
            if state is None or (state.held and not explicit):
                continue
            if state.uncommitted:
                assert state.next_offset is not None  # uncommitted implies a commit point
                result[tp] = OffsetAndMetadata(state.next_offset, "", -1)
        return result

    def mark_committed(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Record that ``offsets`` were committed (so they are not offered again)."""
        for tp, om in offsets.items():
            state = self._partitions.get(tp)
            if state is not None and (state.committed is None or om.offset > state.committed):
                state.committed = om.offset

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        """How many consumed offsets are not yet committable (one partition, or all)."""
        states = (
            [self._partitions[tp]]
            if tp is not None and tp in self._partitions
            else ([] if tp is not None else list(self._partitions.values()))
        )
        return sum(len(s.pending) for s in states)

    def caught_up(self) -> bool:
        """True when nothing is pending and some partition's commit point (not held) is past its last commit."""
        states = self._partitions.values()
        if any(s.pending for s in states):
            return False
        return any(not s.held and s.uncommitted for s in states)

    def all_committed(self) -> bool:
        """True when nothing is pending and every commit point has been committed."""
        return all(
            not s.pending and (s.next_offset is None or s.committed == s.next_offset)
            for s in self._partitions.values()
        )


def _ascending(offsets: Sequence[int]) -> bool:
    """Whether ``offsets`` strictly increase (one C-level pass)."""
    return all(map(operator.lt, offsets, islice(offsets, 1, None)))
