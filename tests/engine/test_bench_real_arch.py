"""The real-architecture benchmark runs end to end (cut down, on CPU) and its configs are the published shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_real_arch.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_real_arch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


def _meta_parameters(config, cls) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


def test_full_configs_have_the_published_sizes() -> None:
    """Full (uncut) configs on the meta device: no memory, but the parameter counts of the real checkpoints."""
    from transformers import LlamaForCausalLM, MllamaForConditionalGeneration

    bench = _bench_module()
    vision = bench.vision_config(None, None, 560, {})
    assert vision.text_config.num_hidden_layers == 40
    assert vision.text_config.cross_attention_layers == [3, 8, 13, 18, 23, 28, 33, 38]
    assert vision.vision_config.image_size == 560 and vision.vision_config.vision_output_dim == 7680
    # Llama 3.2 11B Vision: 10.67B parameters; Llama Guard 3 1B: ~1.5B with its untied head; 8B: 8.03B.
    assert 10.5e9 < _meta_parameters(vision, MllamaForConditionalGeneration) < 10.8e9
    assert 1.45e9 < _meta_parameters(bench.text_guard_config("1b", None, None, {}), LlamaForCausalLM) < 1.55e9
    assert 7.9e9 < _meta_parameters(bench.text_guard_config("8b", None, None, {}), LlamaForCausalLM) < 8.1e9


def test_cut_down_keeps_a_cross_attention_layer_and_real_widths() -> None:
    bench = _bench_module()
    config = bench.vision_config(2, 1024, 560, {"bos_token_id": 1, "eos_token_id": [2], "pad_token_id": 3})
    assert config.text_config.num_hidden_layers == 2 and config.text_config.cross_attention_layers == [1]
    assert config.text_config.hidden_size == 4096 and config.vision_config.hidden_size == 1280
    assert config.vision_config.num_hidden_layers == 2 and config.vision_config.num_global_layers == 1
    assert bench.cross_attention_layers(10) == [3, 8]


@pytest.mark.integration  # runs the benchmark in a subprocess
def test_benchmark_runs_cut_down_on_cpu_and_prints_every_row(tmp_path: Path) -> None:
    """Smallest settings: one layer, small tiles, one batch of 2 — proves the script and its rows, times nothing.

    Every width stays real, so this costs some CPU-seconds: a one-layer 8B slice is ~0.2B parameters."""
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        str(SCRIPT),
        "--device",
        "cpu",
        "--layers",
        "1",
        "--tile-size",
        "56",
        "--batch-sizes",
        "2",
        "--batches",
        "1",
        "--repeats",
        "1",
        "--threads",
        "2",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    assert "cut down to 1 text layers" in done.stdout
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["layers"] == 1
    rows = {(r["model"], r["modality"], r["batch"]): r for r in report["rows"]}
    expected = {("vision", "text", 2), ("vision", "image", 2), ("1b", "text", 2), ("8b", "text", 2)}
    assert set(rows) == expected
    for key, row in rows.items():
        assert row["items_per_s"] > 0 and row["forward_ms_p50"] > 0, key
        # The engine's real prompt: the default policy's template plus a short conversation.
        assert 120 < row["prompt_tokens"] < 400, (key, row["prompt_tokens"])
        assert row["tiles"] == (4 if key[1] == "image" else 0), key
        assert row["text_layers"] == 1
        # Every printed row is in the table too.
        assert any(line.split()[:3] == [key[0], key[1], str(key[2])] for line in done.stdout.splitlines()), (
            key
        )


def test_bad_arguments_are_refused_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    """The script's ``main`` (what ``__main__`` exits with; the subprocess run above proves that path) refuses
    before building anything: in-process, so no second interpreter pays for importing torch and transformers."""
    bench = _bench_module()
    assert bench.main(["--models", "vision,70b"]) == 2
    assert "70b" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2
        assert "--device" in capsys.readouterr().err


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
