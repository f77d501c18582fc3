"""MicroBatcher: flush on size or age, one modality per batch, identical items classified once."""

import pytest

from worker.moderation.batching import MicroBatcher


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def keys_of(batch):
    return [e.key for e in batch.entries]


def test_a_full_batch_is_ready_at_once():
    clock = FakeClock()
    b = MicroBatcher(3, 10.0, clock=clock)
    for k in "abc":
        b.add(k, "text", k)
    [batch] = b.ready()
    assert batch.modality == "text" and keys_of(batch) == ["a", "b", "c"]
    assert len(b) == 0


def test_a_partial_batch_waits_until_max_wait():
    clock = FakeClock()
    b = MicroBatcher(8, 0.5, clock=clock)
    b.add("a", "text", 1)
    clock.now += 0.25
    b.add("b", "text", 2)
    assert b.ready() == []
    assert b.seconds_until_due() == pytest.approx(0.25)
    clock.now += 0.25
    [batch] = b.ready()
    assert keys_of(batch) == ["a", "b"]
    assert b.seconds_until_due() is None


def test_modalities_never_mix():
    clock = FakeClock()
    b = MicroBatcher(2, 1.0, clock=clock)
    b.add("t1", "text", 1)
    b.add("i1", "image", 2)
    b.add("t2", "text", 3)
    [text] = b.ready()
    assert text.modality == "text" and keys_of(text) == ["t1", "t2"]
    clock.now += 1.0
    [image] = b.ready()
    assert image.modality == "image" and keys_of(image) == ["i1"]


def test_identical_items_join_one_entry_and_do_not_count_toward_size():
    clock = FakeClock()
    b = MicroBatcher(2, 1.0, clock=clock)
    assert b.add("same", "text", "e1")
    assert not b.add("same", "text", "e2")
    assert not b.add("same", "text", "e3")
    assert b.ready() == []
    assert len(b) == 3
    b.add("other", "text", "e4")
    [batch] = b.ready()
    assert [e.items for e in batch.entries] == [["e1", "e2", "e3"], ["e4"]]
    assert batch.entries[0].leader == "e1"
    assert batch.item_count == 4


def test_flush_all_hands_out_everything_regardless_of_age():
    clock = FakeClock()
    b = MicroBatcher(10, 60.0, clock=clock)
    b.add("a", "text", 1)
    b.add("b", "image", 2)
    assert sorted(x.modality for x in b.ready(flush_all=True)) == ["image", "text"]


def test_drop_removes_items_of_revoked_partitions():
    clock = FakeClock()
    b = MicroBatcher(2, 1.0, clock=clock)
    b.add("a", "text", ("p0", 1))
    b.add("a", "text", ("p1", 2))
    b.add("b", "text", ("p0", 3))  # fills the batch
    b.add("c", "image", ("p0", 4))
    dropped = b.drop(lambda item: item[0] == "p0")
    assert sorted(dropped) == [("p0", 1), ("p0", 3), ("p0", 4)]
    [batch] = b.ready(flush_all=True)
    assert [e.items for e in batch.entries] == [[("p1", 2)]]


def test_unknown_modality_is_a_bug():
    with pytest.raises(ValueError):
        MicroBatcher(2, 1.0).add("k", "audio", 1)


def test_batches_are_grouped_by_model_and_modality():
    clock = FakeClock()
    b = MicroBatcher(2, 1.0, clock=clock)
    b.add("t1", "text", 1, model="text-guard")
    b.add("t2", "text", 2, model="vision")
    b.add("i1", "image", 3, model="vision")
    b.add("t3", "text", 4, model="text-guard")
    [full] = b.ready()
    assert (full.model, full.modality, keys_of(full)) == ("text-guard", "text", ["t1", "t3"])
    clock.now += 1.0
    rest = {(x.model, x.modality): keys_of(x) for x in b.ready()}
    assert rest == {("vision", "text"): ["t2"], ("vision", "image"): ["i1"]}


def test_the_same_key_for_two_models_is_two_entries():
    b = MicroBatcher(8, 1.0, clock=FakeClock())
    assert b.add("k", "text", 1, model="a")
    assert b.add("k", "text", 2, model="b")
    assert len(b.ready(flush_all=True)) == 2


def test_drop_reaches_every_model_group():
    b = MicroBatcher(8, 1.0, clock=FakeClock())
    b.add("x", "text", 1, model="a")
    b.add("y", "image", 2, model="b")
    assert sorted(b.drop(lambda item: True)) == [1, 2]
    assert len(b) == 0 and b.ready(flush_all=True) == []
