"""Image batches prepared in preparation processes (``batching.prepare_processes``): exact, fault-isolated, reaped.

Real components: the trained tiny Llama Guard 3 Vision checkpoint and its transformers processor, real child
processes (``spawn``), the embedded tansu broker. Faults are injected in the child by a test-only hook run
before each item is decoded (``ImagePreparation(before_item=...)``).
"""

from __future__ import annotations

import base64
import os
import time

import orjson
import psutil
import pytest
import torch

from tests.support.contracts import validate_dead_letter, validate_verdict
from tests.support.kafka_io import (
    WorkerThread,
    committed_offsets,
    end_offsets,
    fully_committed,
    produce,
    read_json,
    run_to_completion,
    wait_for,
)
from worker.config import load_settings
from worker.contracts.decode import decode_event
from worker.contracts.rejections import Reason, Rejection
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.engine.registry import ModelRegistry
from worker.moderation.image_preparation import ImageItem, ImagePreparation
from worker.moderation.moderator import Keyed, Moderator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def image_events(n: int, *, seed: int, prefix: str = "img") -> list[dict]:
    """``n`` distinct image events of the toy policy (safe and unsafe), ids ``{prefix}-{i}``."""
    pool = [e.event for e in synthetic_examples(n * 12 + 50, seed=seed, split="train") if e.has_image]
    assert len(pool) >= n
    return [dict(pool[i], event_id=f"{prefix}-{i}", conversation_id=f"c-{prefix}-{i}") for i in range(n)]


def with_broken_image(record: dict) -> dict:
    """``record`` with its image replaced by bytes that claim to be a PNG and are not."""
    broken = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n not really").decode()
    record = orjson.loads(orjson.dumps(record))
    for part in record["messages"][-1]["content"]:
        if part.get("type") == "image_url":
            part["image_url"]["url"] = broken
    return record


def keyed_items(moderator: Moderator, records: list[dict]) -> list[Keyed]:
    out = []
    for record in records:
        event = decode_event(orjson.dumps(record), moderator.settings)
        assert not isinstance(event, Rejection), event
        routed = moderator.route(event)
        keyed = moderator.load_images(routed)  # type: ignore[arg-type]
        assert isinstance(keyed, Keyed), keyed
        out.append(keyed)
    return out


def fault_on_marked_events(item: ImageItem) -> None:
    """Test-only child hook: ``crash-*`` events kill the preparation process, ``hang-*`` events hang it."""
    if item.event.event_id.startswith("crash-"):
        os._exit(3)
    if item.event.event_id.startswith("hang-"):
        time.sleep(3600)


@pytest.mark.parametrize("share_prompt_prefix", [True, False])
def test_a_batch_prepared_in_a_preparation_process_is_bit_identical_to_one_prepared_in_process(
    guard_engine, engine_settings_overrides, share_prompt_prefix
):
    settings = load_settings(None, **engine_settings_overrides, batching__prepare_processes=1)
    engine = guard_engine.with_mode("single_pass", share_prefix=share_prompt_prefix)
    models = ModelRegistry.of(engine, settings)
    moderator = Moderator(models, settings)
    records = image_events(12, seed=5)
    records[4] = with_broken_image(records[4])
    keyed = keyed_items(moderator, records)

    # In process: what the stream's preparation threads do.
    decoded = [moderator.decode_images(k) for k in keyed]
    assert isinstance(decoded[4], Rejection) and decoded[4].reason is Reason.IMAGE_UNDECODABLE
    local = engine.prepare(
        [
            moderator.ready(k, images).request
            for k, images in zip(keyed, decoded)
            if not isinstance(images, Rejection)
        ]
    )

    preparation = ImagePreparation(settings, models)
    try:
        child = preparation.prepare("default", [ImageItem.of(k) for k in keyed])
    finally:
        preparation.close()

    assert child.rejections[4] == decoded[4]
    assert [r is None for r in child.rejections] == [not isinstance(d, Rejection) for d in decoded]
    remote = child.batch
    assert remote is not None
    assert remote.requests == []  # the decoded images stay in the child
    assert (remote.has_image, remote.mode, remote.rows, remote.errors) == (
        local.has_image,
        local.mode,
        local.rows,
        local.errors,
    )
    assert remote.prefix_keys == local.prefix_keys and remote.prefix_ids == local.prefix_ids
    assert bool(local.prefix_keys) == share_prompt_prefix
    assert sorted(remote.inputs) == sorted(local.inputs)
    assert "pixel_values" in local.inputs
    for name, tensor in local.inputs.items():
        other = remote.inputs[name]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, name
        assert torch.equal(other, tensor), name

    # The model answers the same from either batch.
    remote.requests = list(local.requests)
    assert [r.score for r in engine.run(remote)] == [r.score for r in engine.run(local)]


def test_a_preparation_process_that_crashes_or_hangs_on_an_image_dead_letters_it_and_answers_the_rest(
    make_settings, engine_settings_overrides, guard_engine
):
    settings = make_settings(
        **engine_settings_overrides,
        redis__enabled=False,
        batching__max_size=2,  # small batches: fewer bisection levels, fewer restarts
        batching__max_wait_ms=200,
        batching__prepare_processes=1,
        batching__prepare_timeout_s=5,
    )
    records = image_events(8, seed=7)
    records[2]["event_id"] = "crash-2"
    records[6]["event_id"] = "hang-6"
    produce(settings, [(r["conversation_id"].encode(), orjson.dumps(r)) for r in records], partitions=1)
    preparation = ImagePreparation(
        settings, ModelRegistry.of(guard_engine, settings), before_item=fault_on_marked_events
    )

    worker = run_to_completion(
        settings, guard_engine, 8, timeout_s=400, what="all answered", image_preparation=preparation
    )

    verdicts = read_json(settings, settings.topics.verdicts)
    dead = read_json(settings, settings.topics.dlq)
    ids = [r["event_id"] for r in records]
    assert sorted(v["event_id"] for v in verdicts) == sorted(i for i in ids if i not in ("crash-2", "hang-6"))
    assert sorted(d["event_id"] for d in dead) == ["crash-2", "hang-6"]
    by_id = {d["event_id"]: d for d in dead}
    assert {d["reason"] for d in dead} == {"engine_error"}
    assert "died" in by_id["crash-2"]["message"]
    assert "prepare_timeout_s" in by_id["hang-6"]["message"]
    for v in verdicts:
        validate_verdict(v)
    for d in dead:
        validate_dead_letter(d)
    assert preparation.restarts >= 2  # one per fault at least
    assert worker.pipeline.counters["isolations"] >= 2
    assert committed_offsets(settings, settings.topics.events, partitions=1) == end_offsets(
        settings, settings.topics.events
    )


def test_the_pipeline_with_preparation_processes_answers_every_image_event_as_threads_do_and_leaves_no_child(
    make_settings, engine_settings_overrides, guard_engine
):
    records = image_events(40, seed=9)
    answers = {}
    for processes in (1, 0):
        own = {  # each mode on topics and a group of its own
            f"topics__{topic}": f"{make_settings().topics.events}.{topic}.{processes}"
            for topic in ("events", "verdicts", "flagged", "dlq", "review")
        }
        settings = make_settings(
            **engine_settings_overrides,
            **own,
            kafka__group_id=f"{make_settings().kafka.group_id}-{processes}",
            redis__enabled=False,
            batching__max_size=8,
            batching__prepare_processes=processes,
        )
        produce(settings, [(r["conversation_id"].encode(), orjson.dumps(r)) for r in records])
        worker = WorkerThread(settings, guard_engine).start()
        try:
            wait_for(
                lambda: fully_committed(worker.pipeline, len(records)),
                timeout_s=300,
                what="all committed",
                workers=[worker],
            )
            preparation = worker.pipeline.image_preparation
            children = preparation.pids if preparation is not None else []
        finally:
            worker.stop()
        assert (preparation is not None) == (processes > 0)
        if processes:
            assert len(children) == processes and preparation.restarts == 0
            # Closed with the pipeline: no preparation process outlives it (not even as a zombie).
            alive = {p.pid for p in psutil.Process().children(recursive=True)}
            assert not alive & set(children)
            assert not any(psutil.pid_exists(pid) for pid in children)
        verdicts = read_json(settings, settings.topics.verdicts)
        assert read_json(settings, settings.topics.dlq) == []
        assert sorted(v["event_id"] for v in verdicts) == sorted(r["event_id"] for r in records)
        for v in verdicts:
            validate_verdict(v)
        # Committed only after the acks: every offset of every partition, nothing beyond.
        assert committed_offsets(settings, settings.topics.events) == end_offsets(
            settings, settings.topics.events
        )
        answers[processes] = {v["event_id"]: (v["decision"], v["categories"], v["score"]) for v in verdicts}
    # The same decisions; scores equal up to float noise (batches form by timing, so rows are padded in
    # different company: bit-identical tensors for the same batch are the first test's point).
    assert {k: a[:2] for k, a in answers[1].items()} == {k: a[:2] for k, a in answers[0].items()}
    assert answers[1] == {k: (*a[:2], pytest.approx(a[2], abs=1e-6)) for k, a in answers[0].items()}


def test_a_childs_answer_for_part_of_a_batch_keeps_every_request_and_turns_rejections_into_prepare_errors():
    from worker.engine.engine import PreparedBatch
    from worker.engine.types import EngineError
    from worker.moderation.image_preparation import ChildPrepared, as_batch

    prepared = PreparedBatch(
        [], True, "single_pass", rows=[0, 2], errors={1: EngineError("no", kind="prepare")}
    )
    rejection = Rejection(Reason.IMAGE_UNDECODABLE, "the image could not be decoded (OSError).")
    child = ChildPrepared([None, rejection, None, None], prepared)
    requests = ["r0", "r1", "r2", "r3"]  # stand-ins: only their order matters here

    batch = as_batch(requests, child, "single_pass", has_image=True)

    assert batch.requests == requests
    assert batch.rows == [0, 3]  # the child's rows 0 and 2 are the parent's 0 and 3
    assert sorted(batch.errors) == [1, 2]
    assert batch.errors[1].kind.value == "prepare" and "could not be decoded" in str(batch.errors[1])
    assert str(batch.errors[2]) == "no"


def test_unset_prepare_processes_plans_one_process_only_for_a_model_that_reads_images_on_two_cores():
    from types import SimpleNamespace

    from worker.moderation.image_preparation import planned_processes

    vision = SimpleNamespace(engines={"vision": SimpleNamespace(supports_images=True)})
    text = SimpleNamespace(engines={"text": SimpleNamespace(supports_images=False)})
    unset = load_settings(None)
    assert unset.batching.prepare_processes is None
    assert planned_processes(unset, vision, cores=2) == 1
    assert planned_processes(unset, vision, cores=16) == 1
    assert planned_processes(unset, vision, cores=1) == 0  # no core of its own beside the model
    assert planned_processes(unset, text, cores=16) == 0  # nothing to prepare
    assert planned_processes(load_settings(None, batching__prepare_processes=3), vision, cores=1) == 3
    assert planned_processes(load_settings(None, batching__prepare_processes=0), vision, cores=16) == 0
    assert planned_processes(load_settings(None, batching__prepare_processes=2), text, cores=16) == 0


def test_unset_prepare_processes_starts_a_process_on_the_first_image_backlog_and_prepares_there_once_it_is_up(
    make_settings, engine_settings_overrides, guard_engine, monkeypatch
):
    import worker.moderation.image_preparation

    monkeypatch.setattr(
        worker.moderation.image_preparation, "usable_cores", lambda: 2
    )  # the plan on any runner
    settings = make_settings(**engine_settings_overrides, redis__enabled=False, batching__max_size=8)
    assert settings.batching.prepare_processes is None
    trickle, backlog, after = (
        image_events(3, seed=21, prefix="trickle"),
        image_events(24, seed=22, prefix="backlog"),
        image_events(16, seed=23, prefix="after"),
    )
    worker = WorkerThread(settings, guard_engine).start()
    try:
        produce(settings, [(r["conversation_id"].encode(), orjson.dumps(r)) for r in trickle])
        wait_for(lambda: fully_committed(worker.pipeline, 3), timeout_s=120, what="trickle", workers=[worker])
        preparation = worker.pipeline.image_preparation
        assert preparation is not None
        assert preparation.pids == [] and not preparation.ready  # a few images: no process started
        assert worker.pipeline.status().as_dict()["preparation_processes"] == 0
        produce(settings, [(r["conversation_id"].encode(), orjson.dumps(r)) for r in backlog])
        # Full image batches: the process starts in the background; the threads answer meanwhile.
        wait_for(lambda: preparation.ready, timeout_s=180, what="preparation process up", workers=[worker])
        children = preparation.pids
        assert len(children) == 1
        wait_for(
            lambda: worker.pipeline.status().as_dict()["preparation_processes"] == 1,
            timeout_s=30,
            what="the status reports the process",
            workers=[worker],
        )
        wait_for(
            lambda: fully_committed(worker.pipeline, 27), timeout_s=120, what="backlog", workers=[worker]
        )
        before = preparation.prepared_batches
        produce(settings, [(r["conversation_id"].encode(), orjson.dumps(r)) for r in after])
        wait_for(lambda: fully_committed(worker.pipeline, 43), timeout_s=120, what="after", workers=[worker])
        assert preparation.prepared_batches > before  # the process prepares, now that it is up
        assert preparation.restarts == 0
    finally:
        worker.stop()
    assert not any(psutil.pid_exists(pid) for pid in children)  # closed with the pipeline
    verdicts = read_json(settings, settings.topics.verdicts)
    assert read_json(settings, settings.topics.dlq) == []
    assert sorted(v["event_id"] for v in verdicts) == sorted(r["event_id"] for r in trickle + backlog + after)
    for v in verdicts:
        validate_verdict(v)
    assert committed_offsets(settings, settings.topics.events) == end_offsets(
        settings, settings.topics.events
    )


def test_a_preparation_process_still_starting_is_killed_when_the_worker_stops(
    guard_engine, engine_settings_overrides
):
    settings = load_settings(None, **engine_settings_overrides)
    preparation = ImagePreparation(
        settings, ModelRegistry.of(guard_engine, settings), processes=1, start=False
    )
    assert preparation.pids == [] and not preparation.ready
    preparation.start()
    wait_for(lambda: preparation.pids, timeout_s=30, what="the child spawned")
    children = preparation.pids
    started = time.monotonic()
    preparation.close()  # long before its imports are done
    assert time.monotonic() - started < 5.0
    assert not any(psutil.pid_exists(pid) for pid in children)
    assert not preparation.ready


PARENT_SCRIPT = """
import sys
from worker.config import load_settings
from worker.engine.engine import GuardEngine
from worker.engine.registry import ModelRegistry
from worker.moderation.image_preparation import ImagePreparation

if __name__ == "__main__":
    settings = load_settings(None, model__path=sys.argv[1], model__device="cpu")
    engine = GuardEngine.from_settings(settings)
    preparation = ImagePreparation(settings, ModelRegistry.of(engine, settings), processes=1)
    preparation.wait_started()
    print(" ".join(map(str, preparation.pids)), flush=True)
    sys.stdin.read()  # until killed
"""


def test_a_preparation_process_exits_when_its_worker_is_killed_outright(tmp_path, tiny_model_dir):
    import signal
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    parent = subprocess.Popen(
        [sys.executable, str(script), str(tiny_model_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    try:
        line = parent.stdout.readline()  # the child is up
        children = [int(pid) for pid in line.split()]
        assert len(children) == 1, line
        assert psutil.pid_exists(children[0])
        parent.send_signal(signal.SIGKILL)  # no shutdown, no atexit: the pool is never told
        parent.wait(30)
        wait_for(
            lambda: (
                not any(
                    psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                    for pid in children
                )
            ),
            timeout_s=30,
            what="the orphaned preparation process exited",
        )
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in children if "children" in locals() else []:
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()
