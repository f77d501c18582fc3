"""A rule-based stand-in for ``GuardEngine`` and a dict verdict cache, for fast logic tests of the flow.

Not a model: a text containing ``kill`` is unsafe (S1), anything else safe. Markers in the text drive failures
the way a real model fails: ``POISON`` makes every forward pass containing it raise, ``OOM`` makes a pass of more
than one row containing it run out of memory, ``GARBLED`` gives an answer that does not parse. The integration
tests run the real transformers classes; these fakes only make the logic around them fast to exercise.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from worker.config import Settings
from worker.contracts.verdicts import ModelInfo
from worker.engine.policy import Policy, load_policies, resolve_policy
from worker.engine.registry import ModelRegistry
from worker.engine.types import EngineError, ErrorKind, GuardRequest, GuardResult


class FakeOutOfMemoryError(RuntimeError):
    """What torch raises when the device runs out of memory (matched by name and message)."""

    def __init__(self) -> None:
        super().__init__("CUDA out of memory (fake)")


@dataclass
class FakePrepared:
    requests: list[GuardRequest]


@dataclass
class FakeEngine:
    """Duck-types the parts of ``GuardEngine`` the moderation flow uses (prepare/run/batches/policies)."""

    settings: Settings
    family: str = "llama-guard-3-vision"
    name: str = "fake-guard"
    max_batch_size: int = 8
    supports_images: bool = True
    load_seconds: float = 0.0
    forward_passes: list[int] = field(default_factory=list)  # rows per forward pass run
    broken: bool = False  # every forward pass raises (an engine outage)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.policies: dict[str, Policy] = load_policies(self.settings, self.family)
        self.default_policy_id = self.settings.default_policy
        self.model_info = ModelInfo(self.name, "test")

    @property
    def device(self) -> str:
        return "cpu"

    def policy_for(self, policy_id: str | None) -> Policy:
        return resolve_policy(self.policies, policy_id, self.default_policy_id)

    def batches(self, requests: list[GuardRequest]) -> list[list[int]]:
        chunks = []
        for has_image in (False, True):
            idx = [i for i, r in enumerate(requests) if r.has_image == has_image]
            chunks.extend(idx[s : s + self.max_batch_size] for s in range(0, len(idx), self.max_batch_size))
        return chunks

    def prepare(self, requests: list[GuardRequest]) -> FakePrepared:
        return FakePrepared(list(requests))

    def run(self, prepared: FakePrepared) -> list[GuardResult | EngineError]:
        texts = [" ".join(t for turn in r.turns for t in turn.texts) for r in prepared.requests]
        with self._lock:
            self.forward_passes.append(len(texts))
        if self.broken or any("POISON" in t for t in texts):
            raise RuntimeError("forward pass failed (fake)")
        if len(texts) > 1 and any("OOM" in t for t in texts):
            return [EngineError("out of memory", kind=ErrorKind.OUT_OF_MEMORY) for _ in texts]
        results: list[GuardResult | EngineError] = []
        for text, request in zip(texts, prepared.requests, strict=True):
            if "GARBLED" in text:
                results.append(EngineError("model answer does not parse", raw_output="maybe?"))
            elif "kill" in text:
                codes = ("S1",) if "S1" in request.policy.codes else ()
                results.append(GuardResult(score=0.97, unsafe=True, codes=codes))
            else:
                results.append(GuardResult(score=0.02, unsafe=False, codes=()))
        return results

    def classify(self, requests: list[GuardRequest]) -> list[GuardResult | EngineError]:
        from worker.engine.isolation import classify_in_batches

        return classify_in_batches(self, requests)  # type: ignore[arg-type]


def fake_registry(settings: Settings, **engines: FakeEngine) -> ModelRegistry:
    """A registry of fake engines by model name (default: one fake engine per configured model)."""
    if not engines:
        engines = {
            name: FakeEngine(settings, family=model.family, name=f"fake-{name}")
            for name, model in settings.guard_models().items()
        }
    return ModelRegistry(engines, settings)  # type: ignore[arg-type]


class DictCache:
    """The verdict cache's interface over dicts (``VerdictCache`` is the Redis edge).

    Verdict entries (``get_many``/``set_many``) and the raw values other stores share the connection for
    (``get_raw``/``set_raw``/``get_ranges``/``set_ranges``: the stream's published markers). ``down = True`` behaves like an unreachable
    Redis: every read misses, every write is dropped, nothing raises. TTLs are recorded, not enforced.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.entries: dict[str, dict[str, Any]] = {}
        self.raw: dict[str, bytes] = {}
        self.ttls: dict[str, int] = {}
        self.reads = 0
        self.enabled = enabled
        self.down = False
        self.closed = False

    @property
    def available(self) -> bool:
        return self.enabled and not self.down

    def get_many(self, keys: list[str]) -> list[dict[str, Any] | None]:
        self.reads += 1
        if not self.available:
            return [None] * len(keys)
        return [self.entries.get(k) for k in keys]

    def set_many(self, items: list[tuple[str, dict[str, Any]]]) -> None:
        if self.available:
            self.entries.update(items)

    def get_raw(self, full_keys: list[str]) -> list[bytes | None] | None:
        if not full_keys or not self.available:
            return None
        return [self.raw.get(k) for k in full_keys]

    def set_raw(self, items: list[tuple[str, bytes]], ttl_s: int) -> None:
        if self.available:
            for key, value in items:
                self.raw[key] = value
                self.ttls[key] = ttl_s

    def set_ranges(self, items: list[tuple[str, int, bytes]], ttl_s: int) -> None:
        """SETRANGE: ``data`` written at byte ``at`` of the key's string (a gap is zero bytes)."""
        if self.available:
            for key, at, data in items:
                value = self.raw.get(key, b"")
                value = value.ljust(at, b"\0")
                self.raw[key] = value[:at] + data + value[at + len(data) :]
                self.ttls[key] = ttl_s

    def get_ranges(self, items: list[tuple[str, int, int]]) -> list[bytes] | None:
        """GETRANGE: bytes ``first`` to ``last`` (inclusive) of each key's string."""
        if not items or not self.available:
            return None
        return [self.raw.get(key, b"")[first : last + 1] for key, first, last in items]

    def close(self) -> None:
        self.closed = True
