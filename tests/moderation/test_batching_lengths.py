"""MicroBatcher: length-aware grouping within the time budget, and batches that mix modalities on request."""

from __future__ import annotations

import random

import pytest

from worker.contracts.events import Turn
from worker.moderation.batching import MicroBatcher, conversation_chars, least_padding_sizes, padding_cost


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def by_length(item: tuple[str, int]) -> int:
    return item[1]


def mixed_stream(n: int, seed: int) -> list[tuple[str, int]]:
    """Chat-like lengths: mostly one-liners, some paragraphs, a few long pastes (in characters)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.7:
            length = rng.randint(5, 80)
        elif r < 0.93:
            length = rng.randint(200, 800)
        else:
            length = rng.randint(1500, 4000)
        out.append((f"k{i}", length))
    return out


def run_stream(batcher: MicroBatcher, stream, clock: FakeClock, per_tick: int, tick_s: float):
    """Feed ``per_tick`` items every ``tick_s`` seconds, collecting batches as the pipeline would; returns
    (batches, {key: (added at, handed out at)})."""
    batches, times = [], {}
    for start in range(0, len(stream), per_tick):
        for key, length in stream[start : start + per_tick]:
            batcher.add(key, "text", (key, length))
            times[key] = [clock.now, None]
        for batch in batcher.ready():
            batches.append(batch)
            for e in batch.entries:
                times[e.key][1] = clock.now
        clock.now += tick_s
    while len(batcher):
        for batch in batcher.ready():
            batches.append(batch)
            for e in batch.entries:
                times[e.key][1] = clock.now
        clock.now += tick_s
    return batches, times


def fraction(batches) -> float:
    padded = sum(padding_cost([e.leader[1] for e in b.entries]) for b in batches)
    computed = sum(len(b.entries) * max(e.leader[1] for e in b.entries) for b in batches)
    return padded / computed


# (items per 10 ms tick, the highest padding fraction allowed relative to arrival order)
RATES = [(1, 1.0), (10, 0.99), (40, 0.6), (200, 0.7)]


@pytest.mark.parametrize(("per_tick", "at_most"), RATES)
def test_length_aware_batches_pad_less_than_arrival_order_and_never_hold_an_item_past_max_wait(
    per_tick, at_most
):
    stream = mixed_stream(2000, seed=per_tick)
    max_wait, tick = 0.05, 0.01
    fifo_clock, aware_clock = FakeClock(), FakeClock()
    fifo = MicroBatcher(32, max_wait, lookahead=1, length_of=by_length, clock=fifo_clock)
    aware = MicroBatcher(32, max_wait, lookahead=4, length_of=by_length, clock=aware_clock)
    fifo_batches, _ = run_stream(fifo, stream, fifo_clock, per_tick, tick)
    aware_batches, times = run_stream(aware, stream, aware_clock, per_tick, tick)
    assert sorted(e.key for b in aware_batches for e in b.entries) == sorted(k for k, _ in stream)
    assert all(len(b.entries) <= 32 for b in aware_batches)
    # ready() is called every tick, so an item is handed out by the first call at or after its deadline.
    assert max(out - added for added, out in times.values()) <= max_wait + tick + 1e-9
    # At 1 per tick fewer than max_size items arrive per max_wait: both hand out each due pool as one batch,
    # there is nothing to regroup. The more items arrive within the time budget, the more regrouping pays.
    assert fraction(aware_batches) <= at_most * fraction(fifo_batches)
    # Not bought with many more forward passes.
    assert len(aware_batches) <= len(fifo_batches) + len(fifo_batches) // 4 + 1


def test_a_due_pool_leaves_whole_in_the_fewest_batches_cut_by_length():
    clock = FakeClock()
    b = MicroBatcher(3, 0.5, lookahead=4, length_of=by_length, clock=clock)
    for key, length in [("a", 100), ("b", 3), ("c", 90), ("d", 5), ("e", 4)]:
        b.add(key, "text", (key, length))
    assert b.ready() == []  # 5 entries < 3 x 4: they wait for company, up to max_wait
    assert b.seconds_until_due() == pytest.approx(0.5)
    clock.now += 0.5
    batches = b.ready()
    # Batches leave in the order of their oldest entry ("a"); entries keep arrival order.
    assert [[e.key for e in x.entries] for x in batches] == [["a", "c"], ["b", "d", "e"]]
    assert len(b) == 0 and b.seconds_until_due() is None


def test_a_full_pool_hands_out_the_tightest_window_that_holds_the_oldest_entry():
    clock = FakeClock()
    b = MicroBatcher(2, 10.0, lookahead=2, length_of=by_length, clock=clock)
    for key, length in [("old", 50), ("x", 1), ("y", 52), ("z", 2)]:
        b.add(key, "text", (key, length))
    assert b.seconds_until_due() == 0.0
    [batch] = b.ready()
    # Sorted: x1 z2 old50 y52 -> windows holding "old": (z, old) pads 48, (old, y) pads 2.
    assert [e.key for e in batch.entries] == ["old", "y"]
    clock.now += 10.0
    [rest] = b.ready()
    assert [e.key for e in rest.entries] == ["x", "z"]


def test_the_oldest_waiting_entry_is_always_in_the_next_batch_of_its_pool():
    clock = FakeClock()
    b = MicroBatcher(4, 100.0, lookahead=3, length_of=by_length, clock=clock)
    stream = mixed_stream(300, seed=7)
    waiting: list[str] = []
    for key, length in stream:
        b.add(key, "text", (key, length))
        waiting.append(key)
        for batch in b.ready():
            keys = [e.key for e in batch.entries]
            assert waiting[0] in keys
            waiting = [k for k in waiting if k not in keys]


def test_lookahead_one_is_arrival_order():
    clock = FakeClock()
    b = MicroBatcher(2, 1.0, lookahead=1, length_of=by_length, clock=clock)
    for key, length in [("a", 900), ("b", 1), ("c", 800), ("d", 2)]:
        b.add(key, "text", (key, length))
    assert [[e.key for e in x.entries] for x in b.ready()] == [["a", "b"], ["c", "d"]]


def test_identical_items_still_join_one_entry_while_waiting_for_company():
    clock = FakeClock()
    b = MicroBatcher(2, 1.0, lookahead=4, length_of=by_length, clock=clock)
    assert b.add("same", "text", ("e1", 10))
    clock.now += 0.5
    assert not b.add("same", "text", ("e2", 10))
    assert b.add("other", "text", ("e3", 10))
    assert b.ready() == []
    assert len(b) == 3
    clock.now += (
        0.5  # due by the entry's first item: the follower leaves with it, earlier than its own deadline
    )
    [batch] = b.ready()
    assert [e.items for e in batch.entries] == [[("e1", 10), ("e2", 10)], [("e3", 10)]]


def test_drop_keeps_the_deadline_of_what_stays():
    clock = FakeClock()
    b = MicroBatcher(8, 1.0, lookahead=2, length_of=by_length, clock=clock)
    b.add("a", "text", ("p0", 1))
    clock.now += 0.6
    b.add("b", "text", ("p1", 1))
    assert b.drop(lambda item: item[0] == "p0") == [("p0", 1)]
    assert b.seconds_until_due() == pytest.approx(1.0)


def test_split_models_never_mix_modalities_and_mixing_models_do():
    clock = FakeClock()
    b = MicroBatcher(4, 1.0, mixes_modalities=lambda model: model == "mixer", clock=clock)
    for model in ("splitter", "mixer"):
        b.add("t1", "text", 1, model=model)
        b.add("i1", "image", 2, model=model)
        b.add("t2", "text", 3, model=model)
    clock.now += 1.0
    got = {(x.model, x.modality): [e.key for e in x.entries] for x in b.ready()}
    assert got == {
        ("splitter", "text"): ["t1", "t2"],
        ("splitter", "image"): ["i1"],
        ("mixer", "mixed"): ["t1", "i1", "t2"],
    }


def test_a_mixing_model_fills_batches_across_modalities_and_labels_single_modality_batches_plainly():
    clock = FakeClock()
    b = MicroBatcher(2, 1.0, mixes_modalities=lambda model: True, clock=clock)
    b.add("t1", "text", 1)
    b.add("i1", "image", 2)  # full with one of each: leaves at once
    [batch] = b.ready()
    assert batch.modality == "mixed" and [e.key for e in batch.entries] == ["t1", "i1"]
    b.add("i2", "image", 3)
    b.add("i3", "image", 4)
    [images] = b.ready()
    assert images.modality == "image"


def test_fewer_batches_when_modalities_mix():
    def batches(mix: bool) -> int:
        clock = FakeClock()
        b = MicroBatcher(8, 1.0, mixes_modalities=lambda model: mix, clock=clock)
        count = 0
        for i in range(100):
            b.add(f"k{i}", "image" if i % 3 == 0 else "text", i)
            count += len(b.ready())
            clock.now += 0.05
        return count + len(b.ready(flush_all=True))

    assert batches(True) < batches(False)


def test_least_padding_sizes_cut_where_lengths_jump():
    assert least_padding_sizes([], 4) == []
    assert least_padding_sizes([1, 2, 3], 4) == [3]
    # Two batches of at most 3: (1, 2, 3)(100, 101) pads 2 + 1; the balanced (1, 2)(3, 100, 101) pads 1 + 98.
    assert least_padding_sizes([1, 2, 3, 100, 101], 3) == [3, 2]
    assert least_padding_sizes([1, 2, 90, 95, 100], 3) == [2, 3]
    sizes = least_padding_sizes(list(range(100)), 32)
    assert len(sizes) == 4 and sum(sizes) == 100 and max(sizes) <= 32


def test_padding_cost_and_conversation_chars():
    assert padding_cost([]) == 0
    assert padding_cost([3, 5, 5]) == 2
    turns = (Turn("user", ("hello", "there")), Turn("assistant", ("ok",)))
    assert conversation_chars(turns) == 12


def test_lookahead_must_be_positive():
    with pytest.raises(ValueError):
        MicroBatcher(2, 1.0, lookahead=0)
