"""``moderation-worker demo``: the whole flow on embedded defaults, for a newcomer's first run.

Starts the embedded broker and Redis on 127.0.0.1, builds (or reuses) the trained tiny checkpoint, produces a
sample stream (safe and unsafe, text-only and with images, repeats, a few malformed records), runs the worker
(as a local Ray actor by default: the production shape) until every record has a verdict or a dead letter,
and shows the flagged results and a summary.

Two models, routed as the Llama Guard 3 Vision card advises: text-only events to a text guard
(``text-guard``, family ``llama-guard-3-1b``: the tiny trained ``LlamaForCausalLM`` checkpoint), events with an
image to the Vision model (``vision``, family ``llama-guard-3-vision``: the tiny trained Mllama checkpoint); the
summary counts verdicts per model and family.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.config import Settings

MALFORMED_RECORDS: list[tuple[str, bytes]] = [
    ("invalid_json", b'{"event_id": "broken", "messages": ['),
    ("not_an_object", b'["a", "list"]'),
    (
        "missing_field",
        orjson.dumps({"conversation_id": "c-x", "messages": [{"role": "user", "content": "hi"}]}),
    ),
    ("invalid_utf8", b'{"event_id": "\xff\xfe", "conversation_id": "c", "messages": []}'),
    (
        "unknown_role",
        orjson.dumps(
            {
                "event_id": "bad-role",
                "conversation_id": "c",
                "messages": [{"role": "wizard", "content": "hi"}],
            }
        ),
    ),
    (
        "first_message_not_user",
        orjson.dumps(
            {
                "event_id": "bad-order",
                "conversation_id": "c",
                "messages": [{"role": "assistant", "content": "hello"}],
            }
        ),
    ),
]


@dataclass
class SampleStream:
    """What the demo produced, to check the outputs against."""

    records: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, value)
    expected: dict[str, tuple[str, tuple[str, ...]]] = field(
        default_factory=dict
    )  # event_id -> (decision, codes)
    malformed: int = 0
    repeats: int = 0
    images: int = 0


def sample_stream(
    n_events: int,
    *,
    seed: int = 7,
    image_share: float = 0.1,
    repeat_share: float = 0.2,
    malformed_share: float = 0.02,
) -> SampleStream:
    """A deterministic sample stream built from the tiny model's held-out synthetic conversations."""
    from worker.dev.tiny_model.synthetic import synthetic_examples

    rng = random.Random(seed)
    pool = synthetic_examples(max(64, n_events), seed=seed, split="heldout")
    with_image = [e for e in pool if _has_image(e.event)]
    text_only = [e for e in pool if not _has_image(e.event)]
    stream = SampleStream()
    n_malformed = max(1, round(n_events * malformed_share)) if n_events >= 20 else 0
    n_valid = n_events - n_malformed
    originals: list[Any] = []  # examples already sent once
    for i in range(n_valid):
        if originals and rng.random() < repeat_share:
            example = rng.choice(originals)  # same conversation content, new event id: a cache hit
            stream.repeats += 1
        else:
            example = rng.choice(with_image if with_image and rng.random() < image_share else text_only)
            originals.append(example)
        event = dict(example.event)
        event["event_id"] = f"demo-{i:05d}-{uuid.UUID(int=rng.getrandbits(128)).hex[:8]}"
        stream.images += _has_image(event)
        stream.expected[event["event_id"]] = (example.decision, tuple(example.codes))
        stream.records.append((event["conversation_id"].encode(), orjson.dumps(event)))
    for j in range(n_malformed):
        _, raw = MALFORMED_RECORDS[j % len(MALFORMED_RECORDS)]
        stream.records.insert(rng.randrange(len(stream.records) + 1), (b"malformed", raw))
        stream.malformed += 1
    return stream


def _has_image(event: dict[str, Any]) -> bool:
    for m in event.get("messages", []):
        content = m.get("content")
        if isinstance(content, list) and any(p.get("type") == "image_url" for p in content):
            return True
    return False


@dataclass
class Outputs:
    """Everything the worker published, gathered by a reader thread."""

    verdicts: list[dict[str, Any]] = field(default_factory=list)
    flagged: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    done_sources: set[tuple[int, int]] = field(default_factory=set)


def collect_outputs(
    settings: Settings, total: int, on_progress: Callable[[int], None], timeout_s: float
) -> Outputs:
    """Read the verdicts, flagged and DLQ topics until every input offset has an answer (or timeout)."""
    from worker.stream.kafka_clients import make_consumer

    out = Outputs()
    topics = [settings.topics.verdicts, settings.topics.flagged, settings.topics.dlq]
    consumer = make_consumer(
        settings, group_id=f"demo-reader-{uuid.uuid4().hex[:8]}", enable_auto_commit=False
    )
    consumer.subscribe(topics)
    deadline = time.monotonic() + timeout_s
    try:
        while len(out.done_sources) < total and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=200).items():
                for rec in records:
                    value = orjson.loads(rec.value)
                    if tp.topic == settings.topics.flagged:
                        out.flagged.append(value)
                        continue
                    (out.verdicts if tp.topic == settings.topics.verdicts else out.dead_letters).append(value)
                    src = value.get("source") or {}
                    out.done_sources.add((src.get("partition", -1), src.get("offset", -1)))
            on_progress(len(out.done_sources))
    finally:
        consumer.close()
    return out


def _decision_span_s(out: Outputs) -> float:
    """Seconds from the first to the last answer, by the workers' own timestamps (the reader joins late)."""
    stamps = [
        datetime.fromisoformat(r["decided_at" if "decided_at" in r else "failed_at"])
        for r in out.verdicts + out.dead_letters
    ]
    return (max(stamps) - min(stamps)).total_seconds() if stamps else 0.0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def show_results(console: Console, stream: SampleStream, out: Outputs, elapsed_s: float) -> int:
    """Print flagged results and the summary; return the number of records that got no answer."""
    by_id = {v["event_id"]: v for v in out.verdicts}
    flagged = Table(title=f"Flagged ({len({v['event_id'] for v in out.flagged})} events; first 15)")
    for col in ("event_id", "task", "model", "categories", "score", "cached"):
        flagged.add_column(col)
    for v in sorted({v["event_id"]: v for v in out.flagged}.values(), key=lambda v: v["event_id"])[:15]:
        cats = ", ".join(f"{c['code']} {c['name']}" for c in v["categories"]) or "-"
        flagged.add_row(
            v["event_id"],
            v["task"],
            _model_name(v),
            cats,
            f"{v['score']:.3f}",
            "yes" if v["cached"] else "no",
        )
    console.print(flagged)

    decisions = Counter(v["decision"] for v in by_id.values())
    per_model = verdicts_per_model(by_id.values())
    categories = Counter(c["code"] for v in by_id.values() for c in v["categories"])
    reasons = Counter(d["reason"] for d in out.dead_letters)
    cached = sum(1 for v in by_id.values() if v["cached"])
    agree = sum(
        1 for eid, v in by_id.items() if eid in stream.expected and stream.expected[eid][0] == v["decision"]
    )
    agree_per_model: dict[str, list[int]] = {}
    for eid, v in by_id.items():
        if eid in stream.expected:
            counts = agree_per_model.setdefault(_model_label(v), [0, 0])
            counts[0] += stream.expected[eid][0] == v["decision"]
            counts[1] += 1
    latencies = [v["latency_ms"] for v in by_id.values()]
    lost = len(stream.records) - len(out.done_sources)
    summary = Table(title="Summary", show_header=False)
    summary.add_column("what")
    summary.add_column("value")
    rows = [
        (
            "events produced",
            (
                f"{len(stream.records)} ({stream.images} with an image, {stream.repeats} repeats, "
                f"{stream.malformed} malformed)"
            ),
        ),
        ("verdicts", ", ".join(f"{k} {n}" for k, n in sorted(decisions.items())) or "none"),
        (
            "verdicts per model",
            "; ".join(
                f"{model}: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
                for model, counts in sorted(per_model.items())
            )
            or "none",
        ),
        ("verdicts by category", ", ".join(f"{k} {n}" for k, n in sorted(categories.items())) or "none"),
        ("dead letters by reason", ", ".join(f"{k} {n}" for k, n in sorted(reasons.items())) or "none"),
        ("cache hits", f"{cached} of {len(by_id)} verdicts"),
        (
            "agreement with the toy policy",
            f"{agree}/{len(by_id)} ("
            + "; ".join(f"{model}: {a}/{n}" for model, (a, n) in sorted(agree_per_model.items()))
            + ")",
        ),
        (
            "throughput",
            (
                f"{len(out.done_sources) / max(elapsed_s, 1e-6):.1f} events/s from first to last answer "
                f"({elapsed_s:.1f} s; includes waiting for the second wave)"
            ),
        ),
        (
            "worker latency p50 / p99",
            f"{_percentile(latencies, 0.5):.1f} ms / {_percentile(latencies, 0.99):.1f} ms",
        ),
        ("records without an answer", str(lost)),
    ]
    for k, v in rows:
        summary.add_row(k, v)
    console.print(summary)
    return lost


def _model_name(verdict: dict[str, Any]) -> str:
    return verdict["model"].get("name") or verdict["model"]["id"]


def _model_label(verdict: dict[str, Any]) -> str:
    """``name (family)`` of the judging model; the name alone for verdicts without a family."""
    family = verdict["model"].get("family")
    return f"{_model_name(verdict)} ({family})" if family else _model_name(verdict)


def verdicts_per_model(verdicts: Any) -> dict[str, Counter[str]]:
    """``{"name (family)": Counter(decision)}`` over ``verdicts`` (each judged by the model its ``model`` names)."""
    per_model: dict[str, Counter[str]] = {}
    for v in verdicts:
        per_model.setdefault(_model_label(v), Counter())[v["decision"]] += 1
    return per_model


def demo_models(settings: Settings, vision_dir: str, text_guard_dir: str) -> None:
    """Configure the demo's two models on ``settings`` unless it names its own ``models``.

    ``text-guard`` (family ``llama-guard-3-1b``, loaded from ``text_guard_dir``) judges text-only events and
    ``vision`` (family ``llama-guard-3-vision``, from ``vision_dir``) image events: both tiny checkpoints the
    project builds and trains offline.
    """
    if settings.models:
        return
    device = settings.model.device
    settings.models = {
        "text-guard": {"path": text_guard_dir, "device": device, "family": "llama-guard-3-1b"},
        "vision": {"path": vision_dir, "device": device, "family": "llama-guard-3-vision"},
    }
    settings.routing = {"text": "text-guard", "image": "vision"}


def demo_command(
    settings: Settings,
    *,
    n_events: int = 400,
    use_ray: bool = True,
    console: Console | None = None,
    timeout_s: float = 900.0,
) -> int:
    """Run the demo; exit 0 when every record got a verdict or a dead letter."""
    from worker.dev.services import EmbeddedServices
    from worker.dev.tiny_model.build import ensure_tiny_model
    from worker.stream.kafka_clients import ensure_topics, make_producer
    from worker.stream.publisher import output_topics

    console = console or Console()
    console.rule("moderation-worker demo")
    with console.status("building or reusing the tiny trained Llama Guard checkpoints (text guard, Vision)"):
        text_guard_dir = ensure_tiny_model(train=True, family="llama-guard-3-1b")
        vision_dir = ensure_tiny_model(train=True)
    console.print(f"text guard (llama-guard-3-1b): {text_guard_dir}")
    console.print(f"vision (llama-guard-3-vision): {vision_dir}")
    with EmbeddedServices() as services:
        console.print(f"embedded broker: {services.kafka_bootstrap}   redis: {services.redis_url}")
        run_id = uuid.uuid4().hex[:6]
        settings = settings.model_copy(deep=True)
        settings.kafka.bootstrap_servers = [services.kafka_bootstrap]
        settings.kafka.session_timeout_ms = 6000
        settings.redis.url = services.redis_url
        demo_models(settings, str(vision_dir), str(text_guard_dir))
        settings.kafka.group_id = f"demo-{run_id}"
        settings.ops.port = 0
        settings.logging.level = (
            "WARNING"  # keep the progress display readable; the summary says what happened
        )
        stream = sample_stream(n_events)
        ensure_topics(settings, [settings.topics.events], partitions=4)
        ensure_topics(settings, output_topics(settings.topics))
        # Two waves, like a live stream: the second wave's repeats arrive after their originals were
        # judged, so they are answered from the Redis cache.
        split = len(stream.records) * 3 // 5
        producer = make_producer(settings)

        def send(records: list[tuple[bytes, bytes]]) -> None:
            for key, value in records:
                producer.send(settings.topics.events, key=key, value=value)
            producer.flush(timeout=60)

        send(stream.records[:split])
        console.print(
            f"produced {split} records to {settings.topics.events} (4 partitions); "
            f"{len(stream.records) - split} more once half are answered"
        )

        runner = _start_runner(settings, use_ray, console)
        second_wave_sent = False

        def on_progress(n: int, update: Callable[[int], None]) -> None:
            nonlocal second_wave_sent
            update(n)
            if not second_wave_sent and n >= split // 2:
                send(stream.records[split:])
                second_wave_sent = True

        try:
            with Progress(
                TextColumn("[bold]moderating"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                task = progress.add_task("moderating", total=len(stream.records))
                out = collect_outputs(
                    settings,
                    len(stream.records),
                    lambda n: on_progress(n, lambda k: progress.update(task, completed=k)),
                    timeout_s,
                )
        finally:
            producer.close(timeout=10)
            runner()
        elapsed = _decision_span_s(out)
        lost = show_results(console, stream, out, elapsed)
        if lost:
            console.print(
                f"[red]{lost} record(s) got no verdict and no dead letter within {timeout_s:.0f} s[/red]"
            )
            return 1
        console.print("[green]every record got a verdict or a dead letter[/green]")
        return 0


def _start_runner(settings: Settings, use_ray: bool, console: Console) -> Callable[[], None]:
    """Start the worker; return a function that stops it (drain, commit, close)."""
    if use_ray:
        from worker.runners.ray_fleet import start_local_workers

        console.print(
            "worker: one GuardWorker Ray actor on a local Ray instance (127.0.0.1), holding "
            f"{', '.join(settings.guard_models())}"
        )
        return start_local_workers(settings)
    from worker.stream.pipeline import StreamPipeline

    pipeline = StreamPipeline(settings, worker_name="demo")
    thread = threading.Thread(target=pipeline.run, name="pipeline", daemon=True)
    thread.start()
    console.print("worker: in-process pipeline")

    def stop() -> None:
        pipeline.request_stop()
        thread.join(timeout=settings.shutdown.drain_timeout_s + 10)

    return stop
