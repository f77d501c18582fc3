"""The demo end to end (in-process worker: the Ray variant is the same pipeline in an actor)."""

from __future__ import annotations

import os

import pytest
from rich.console import Console

from worker.commands.demo import demo_command, verdicts_per_model
from worker.config import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_verdicts_are_counted_per_judging_model():
    verdicts = [
        {
            "decision": "safe",
            "model": {"id": "t", "revision": None, "name": "text-guard", "family": "llama-guard-3-1b"},
        },
        {
            "decision": "unsafe",
            "model": {"id": "t", "revision": None, "name": "text-guard", "family": "llama-guard-3-1b"},
        },
        {
            "decision": "safe",
            "model": {"id": "v", "revision": None, "name": "vision", "family": "llama-guard-3-vision"},
        },
        {"decision": "safe", "model": {"id": "legacy", "revision": None}},
    ]
    per_model = verdicts_per_model(verdicts)
    assert per_model == {
        "text-guard (llama-guard-3-1b)": {"safe": 1, "unsafe": 1},
        "vision (llama-guard-3-vision)": {"safe": 1},
        "legacy": {"safe": 1},
    }


def test_the_demo_runs_two_models_and_its_summary_shows_verdicts_per_model(
    tiny_model_dir, tiny_text_guard_dir, monkeypatch
):
    # A developer shell's settings stay out; where the tiny checkpoints are cached (MW_CACHE_DIR) stays in.
    for key in [k for k in os.environ if k.startswith("MW_") and k != "MW_CACHE_DIR"]:
        monkeypatch.delenv(key)
    console = Console(record=True, width=240)
    assert demo_command(Settings(), n_events=120, use_ray=False, console=console, timeout_s=600) == 0
    text = console.export_text()
    assert str(tiny_text_guard_dir) in text and str(tiny_model_dir) in text, "the two real checkpoints"
    line = next(line for line in text.splitlines() if "verdicts per model" in line)
    assert "text-guard (llama-guard-3-1b):" in line and "vision (llama-guard-3-vision):" in line
    assert "records without an answer" in text
