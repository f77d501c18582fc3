"""Decode + validate throughput for ~1 KB chat events: orjson vs our duplicate-key check vs stdlib json.

Run: .venv/bin/python benchmarks/bench_decode.py [--events 20000] [--repeats 3]

Prints events/s (best of the repeats) for, in the same run:
  orjson            orjson.loads + compiled schema check (misses duplicate keys: last one wins silently)
  orjson+colons     orjson.loads + our duplicate-key check (colon count vs orjson.dumps) + schema check
  json+pairs_hook   stdlib json.loads with an object_pairs_hook that refuses duplicates + schema check
  json              stdlib json.loads (also misses duplicates) + schema check
  decode_event      the worker's full decoder (all of the above checks plus conversation rules, limits, URLs)
and the ratios to the orjson baseline. No thresholds: figures only.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import orjson

from worker.config import Settings
from worker.contracts.decode import _duplicate_key, decode_event
from worker.contracts.events import ChatEvent
from worker.contracts.schemas import CHAT_EVENT, validator


def sample_events(n: int) -> list[bytes]:
    """``n`` distinct ~1 KB events: a system message, three user/assistant turns, metadata."""
    filler = "The quick brown fox jumps over the lazy dog; what does it mean? "
    events = []
    for i in range(n):
        event = {
            "event_id": f"evt-{i:08d}",
            "conversation_id": f"conv-{i % 97}",
            "created_at": "2026-11-23T12:00:00.000Z",
            "tenant": "acme",
            "metadata": {"gateway_request_id": f"req-{i}", "model": "gpt-4o-mini"},
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [{"type": "text", "text": f"Question {i}: " + filler * 3}]},
                {"role": "assistant", "content": "Answer: " + filler * 4},
                {"role": "user", "content": "Thanks! One more: " + filler * 2},
            ],
        }
        events.append(orjson.dumps(event))
    return events


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    settings = Settings()
    schema = validator(CHAT_EVENT)
    events = sample_events(args.events)
    assert all(isinstance(decode_event(e, settings), ChatEvent) for e in events[:100])

    def orjson_only(raw: bytes) -> bool:
        return schema.is_valid(orjson.loads(raw))

    def orjson_colons(raw: bytes) -> bool:
        obj = orjson.loads(raw)
        return _duplicate_key(raw, obj) is None and schema.is_valid(obj)

    def json_pairs_hook(raw: bytes) -> bool:
        return schema.is_valid(json.loads(raw, object_pairs_hook=_refuse_duplicates))

    def json_plain(raw: bytes) -> bool:
        return schema.is_valid(json.loads(raw))

    def full(raw: bytes) -> bool:
        return isinstance(decode_event(raw, settings), ChatEvent)

    candidates: dict[str, Callable[[bytes], bool]] = {
        "orjson": orjson_only,
        "orjson+colons": orjson_colons,
        "json+pairs_hook": json_pairs_hook,
        "json": json_plain,
        "decode_event": full,
    }
    rates: dict[str, float] = {}
    for name, fn in candidates.items():
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            ok = sum(map(fn, events))
            best = min(best, time.perf_counter() - start)
            assert ok == len(events), name
        rates[name] = len(events) / best
    mean_size = sum(map(len, events)) / len(events)
    print(f"{len(events)} events, mean {mean_size:.0f} bytes, best of {args.repeats}")
    for name, rate in rates.items():
        print(
            f"  {name:16s} {rate:>10,.0f} events/s  {1e6 / rate:7.1f} us/event  "
            f"x{rate / rates['orjson']:.2f} of orjson"
        )
    print(
        f"duplicate-key check cost: colons {1e6 / rates['orjson+colons'] - 1e6 / rates['orjson']:.1f} us/event, "
        f"pairs_hook {1e6 / rates['json+pairs_hook'] - 1e6 / rates['orjson']:.1f} us/event over orjson"
    )


if __name__ == "__main__":
    main()
