"""Which offsets may be committed: the highest contiguous completed offset per partition.

The rule Quix Streams and arroyo follow: an offset is committable only when it and every offset
consumed before it on the same partition are *completed* (their verdict or dead letter was
acknowledged by the broker). Completion may arrive out of order; the commit point only moves over a
contiguous run of completed offsets, in the order they were consumed (so gaps in the offset numbers,
e.g. from compaction or transaction markers, never block progress).

Pure bookkeeping: no Kafka calls. The pipeline registers, completes, commits and revokes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kafka.structs import OffsetAndMetadata, TopicPartition


@dataclass
class _PartitionState:
    """Offsets consumed but not yet committable, in consumption order."""

    pending: deque[int] = field(default_factory=deque)
    completed: set[int] = field(default_factory=set)
    highest_registered: int = -1
    next_offset: int | None = None  # the offset to commit (last contiguous completed + 1)
    committed: int | None = None  # what was last committed (acknowledged by the group coordinator)


class OffsetTracker:
    """Per-partition record of consumed and completed offsets; yields what may be committed."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionState] = {}

    def assign(self, tp: TopicPartition) -> None:
        """Start tracking ``tp`` from scratch (a new assignment: old state is meaningless)."""
        self._partitions[tp] = _PartitionState()

    def revoke(self, tp: TopicPartition) -> None:
        """Forget ``tp``: its in-flight offsets will be consumed again by its next owner."""
        self._partitions.pop(tp, None)

    def owns(self, tp: TopicPartition) -> bool:
        """Whether ``tp`` is currently tracked (assigned and not revoked)."""
        return tp in self._partitions

    @property
    def partitions(self) -> list[TopicPartition]:
        """The tracked partitions."""
        return list(self._partitions)

    def register(self, tp: TopicPartition, offset: int) -> bool:
        """Record ``offset`` as consumed. Returns False (and ignores it) for a duplicate or an old offset.

        An untracked partition is tracked implicitly (records can arrive before the assignment callback
        when partitions are assigned manually).
        """
        state = self._partitions.get(tp)
        if state is None:
            state = self._partitions[tp] = _PartitionState()
        if offset <= state.highest_registered:
            return False
        state.highest_registered = offset
        state.pending.append(offset)
        return True

    def complete(self, tp: TopicPartition, offset: int) -> bool:
        """Mark ``offset`` as done. Returns False if the partition or offset is not pending (ignored)."""
        state = self._partitions.get(tp)
        if state is None or offset > state.highest_registered or offset in state.completed:
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

    def committable(
        self, partitions: list[TopicPartition] | None = None
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """``{tp: OffsetAndMetadata(next_offset)}`` for partitions whose commit point moved past the last commit."""
        result: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp in partitions if partitions is not None else list(self._partitions):
            state = self._partitions.get(tp)
            if state is None or state.next_offset is None:
                continue
            if state.committed is None or state.next_offset > state.committed:
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

    def all_committed(self) -> bool:
        """True when nothing is pending and every commit point has been committed."""
        return all(
            not s.pending and (s.next_offset is None or s.committed == s.next_offset)
            for s in self._partitions.values()
        )
