"""A guard engine that answers by rule, for the stream's logic tests (no model, no torch work).

``ScriptedEngine`` has the surface the stream and the model registry use — ``policies``,
``default_policy_id``, ``policy_for``, ``family``, ``model_info``, ``max_images``, ``load_seconds``,
``prepare`` and ``run`` — and reports failures the way ``GuardEngine`` does (errors as values):

- a text containing ``UNSAFE`` is judged unsafe (S1, score 0.93); anything else safe (score 0.02);
- a batch holding a ``POISON`` text fails its forward pass: every row gets ``EngineError(kind="model")``
  (a kernel fault on one item sinks its batch, as on a device);
- a ``GARBLED`` text gets an answer that does not parse (``EngineError`` without a fault kind);
- ``broken = True``: every forward pass fails, the probe's too (an engine outage);
- ``gate``: while cleared, ``run`` waits for it (work held inside the model).

Integration tests keep the real ``GuardEngine`` on the tiny checkpoints; this one only sits beside them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from worker.config import Settings
from worker.contracts.verdicts import ModelInfo
from worker.engine.policy import Policy, load_policies, resolve_policy
from worker.engine.types import EngineError, GuardRequest, GuardResult

UNSAFE = "UNSAFE"
POISON = "POISON"
GARBLED = "GARBLED"


@dataclass
class ScriptedBatch:
    """What ``prepare`` hands to ``run``: the requests, unchanged."""

    requests: list[GuardRequest]

    def __len__(self) -> int:
        return len(self.requests)


def request_text(request: GuardRequest) -> str:
    """Every text of a request, joined."""
    return " ".join(text for turn in request.turns for text in turn.texts)


class ScriptedEngine:
    """Judges by keyword; fails on command. ``batches`` records the size of every forward pass."""

    def __init__(self, settings: Settings, *, model_id: str = "scripted/guard") -> None:
        self.family = settings.model.family
        self.policies: dict[str, Policy] = load_policies(settings, self.family)
        self.default_policy_id = settings.default_policy
        self.model_info = ModelInfo(id=model_id, revision="test")
        self.max_images = 1
        self.supports_images = True
        self.load_seconds = 0.0
        self.broken = False
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[int] = []

    def policy_for(self, policy_id: str | None) -> Policy:
        """The policy an event names (None: the default)."""
        return resolve_policy(self.policies, policy_id, self.default_policy_id)

    def prepare(self, requests: Sequence[GuardRequest]) -> ScriptedBatch:
        """Nothing to tokenize: the batch is its requests."""
        if not requests:
            raise ValueError("prepare() needs at least one request")
        return ScriptedBatch(list(requests))

    def run(self, batch: ScriptedBatch) -> list[GuardResult | EngineError]:
        """One result per request, or the same forward-pass error on every row."""
        if not self.gate.wait(timeout=30):
            raise TimeoutError("the scripted engine's gate stayed closed for 30 s")
        self.batches.append(len(batch.requests))
        texts = [request_text(r) for r in batch.requests]
        if self.broken or any(POISON in t for t in texts):
            return [EngineError("model failed: simulated fault", detail={"kind": "model"}) for _ in texts]
        results: list[GuardResult | EngineError] = []
        for text in texts:
            if GARBLED in text:
                results.append(EngineError("the answer does not parse", raw_output="unsafe\nS99<junk>"))
            elif UNSAFE in text:
                results.append(GuardResult(score=0.93, unsafe=True, codes=("S1",)))
            else:
                results.append(GuardResult(score=0.02, unsafe=False, codes=()))
        return results
