"""``moderation-worker eval`` on the trained tiny checkpoint: printed tables equal a hand-built confusion
matrix, plots and a schema-valid report are written, bad lines are reported with their numbers."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from worker.config import load_settings
from worker.contracts.schemas import validator
from worker.evaluation.run import eval_command
from worker.evaluation.sample_set import SAMPLE_PATH, sample_lines

pytestmark = pytest.mark.integration


def _run(data: Path, out: Path, guard_engine, engine_settings_overrides, **kw) -> tuple[int, str]:
    buf = io.StringIO()
    console = Console(file=buf, width=160, color_system=None)
    settings = load_settings(None, **engine_settings_overrides)
    code = eval_command(
        data,
        settings,
        out_dir=out,
        target_fpr=kw.pop("target_fpr", 0.05),
        strict=kw.pop("strict", False),
        engine=guard_engine,
        console=console,
    )
    return code, buf.getvalue()


def test_committed_sample_set_is_what_the_generator_makes():
    assert SAMPLE_PATH.read_bytes() == b"\n".join(sample_lines()) + b"\n"


def _with_flipped_labels(path: Path, every: int) -> Path:
    """The sample set with every ``every``-th label flipped, so the confusion matrix has all four cells."""
    lines = []
    for i, line in enumerate(SAMPLE_PATH.read_bytes().splitlines()):
        obj = orjson.loads(line)
        if i % every == 0:
            unsafe = obj["label"]["decision"] == "unsafe"
            obj["label"] = (
                {"decision": "safe", "categories": []}
                if unsafe
                else {"decision": "unsafe", "categories": ["S9"]}
            )
        lines.append(orjson.dumps(obj))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_printed_metrics_equal_a_hand_built_confusion_matrix(
    tmp_path, guard_engine, engine_settings_overrides
):
    data = _with_flipped_labels(tmp_path / "data.jsonl", every=6)
    code, printed = _run(data, tmp_path, guard_engine, engine_settings_overrides)
    assert code == 0, printed
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    validator("eval_report").validate(report)
    labels = [orjson.loads(line)["label"] for line in data.read_bytes().splitlines()]
    assert len(report["items"]) == len(labels) == report["data"]["evaluated"]

    for task, title in (("prompt", "Prompt Classification"), ("response", "Response Classification")):
        tp = fp = fn = tn = 0
        for item in report["items"]:
            if item["task"] != task:
                continue
            expected = labels[item["line"] - 1]["decision"] == "unsafe"
            predicted = item["predicted"]["unsafe"]
            tp += expected and predicted
            fp += (not expected) and predicted
            fn += expected and not predicted
            tn += (not expected) and not predicted
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        fpr = fp / (fp + tn) if fp + tn else 0.0
        row = re.search(
            rf"{title}\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│\s*(\d+)", printed
        )
        assert row, printed
        assert [float(x) for x in row.groups()[:4]] == [round(v, 3) for v in (precision, recall, f1, fpr)]
        assert int(row.group(5)) == tp + fn
        assert report["table1"][task]["tp"] == tp and report["table1"][task]["fp"] == fp
        assert min(tp, fp, fn, tn) > 0, (task, tp, fp, fn, tn)  # every cell exercised

    # Table 2: per-category F1 from the items, one-vs-rest.
    for code_ in ("S1", "S9", "S13"):
        tp = sum(
            1
            for it in report["items"]
            if code_ in labels[it["line"] - 1]["categories"] and code_ in it["predicted"]["categories"]
        )
        fp = sum(
            1
            for it in report["items"]
            if code_ not in labels[it["line"] - 1]["categories"] and code_ in it["predicted"]["categories"]
        )
        fn = sum(
            1
            for it in report["items"]
            if code_ in labels[it["line"] - 1]["categories"] and code_ not in it["predicted"]["categories"]
        )
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        row = re.search(rf"{code_} [^│]*│\s*([\d.]+)", printed)
        assert row and float(row.group(1)) == round(f1, 3), printed
    # The unflipped five sixths are right: the trained tiny model follows its toy policy.
    assert 0.6 < report["table1"]["all"]["f1"] < 0.95, report["table1"]["all"]
    for name in ("pr_curve.png", "category_f1.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert "Recommended threshold" in printed


def test_bad_lines_are_reported_with_numbers_and_skipped_or_fatal(
    tmp_path, guard_engine, engine_settings_overrides
):
    good = sample_lines(4)
    data = tmp_path / "data.jsonl"
    data.write_bytes(
        b"\n".join(
            [
                good[0],
                b'{"event": {"event_id": "x"}}',  # line 2: no label
                b"not json",  # line 3
                orjson.dumps(
                    {
                        "event": {"event_id": "e", "conversation_id": "c", "messages": []},
                        "label": {"decision": "safe", "categories": []},
                    }
                ),  # line 4: invalid event
                good[1],
                orjson.dumps(
                    {"event": orjson.loads(good[2])["event"], "label": {"decision": "unsafe"}}
                ),  # 6: no codes
            ]
        )
        + b"\n"
    )
    code, printed = _run(data, tmp_path / "out", guard_engine, engine_settings_overrides)
    assert code == 0, printed
    report = orjson.loads((tmp_path / "out" / "report.json").read_bytes())
    skipped = {s["line"]: s["reason"] for s in report["data"]["skipped_lines"]}
    assert skipped == {2: "bad_label", 3: "invalid_json", 4: "empty_conversation", 6: "bad_label"}
    assert report["data"]["evaluated"] == 2
    for line in (2, 3, 4, 6):
        assert f"line {line}:" in printed
    code, printed = _run(data, tmp_path / "strict", guard_engine, engine_settings_overrides, strict=True)
    assert code == 1 and "--strict" in printed
    assert not (tmp_path / "strict" / "report.json").exists()


def test_eval_cli_reports_a_missing_file(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "worker", "eval", str(tmp_path / "nope.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "not found" in out.stdout + out.stderr


def test_eval_reports_table1_per_model_when_two_models_judge(tmp_path, tiny_model_dir, tiny_text_guard_dir):
    settings = load_settings(
        None,
        models={
            "text": {"path": str(tiny_text_guard_dir), "device": "cpu", "family": "llama-guard-3-1b"},
            "vision": {"path": str(tiny_model_dir), "device": "cpu", "family": "llama-guard-3-vision"},
        },
    )
    settings.routing = {"text": "text", "image": "vision"}
    buf = io.StringIO()
    console = Console(file=buf, width=160, color_system=None)
    code = eval_command(
        SAMPLE_PATH, settings, out_dir=tmp_path, target_fpr=0.05, strict=False, console=console
    )
    printed = buf.getvalue()
    assert code == 0, printed
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    validator("eval_report").validate(report)
    images = {
        orjson.loads(line)["event"]["event_id"]
        for line in SAMPLE_PATH.read_bytes().splitlines()
        if "image_url" in line.decode()
    }
    assert images, "the sample set has image items"
    for item in report["items"]:
        assert item["model"] == ("vision" if item["event_id"] in images else "text")
    per_model = report["table1_by_model"]
    assert set(per_model) == {"text", "vision"}
    assert (
        per_model["text"]["all"]["total"] + per_model["vision"]["all"]["total"]
        == report["table1"]["all"]["total"]
    )
    assert per_model["vision"]["all"]["total"] == len(images)
    assert "Table 1, model text (llama-guard-3-1b)" in printed
    assert "Table 1, model vision (llama-guard-3-vision)" in printed
    assert {n: m["family"] for n, m in report["models"].items()} == {
        "text": "llama-guard-3-1b",
        "vision": "llama-guard-3-vision",
    }
    # Real decisions from each model: the tiny text guard follows the toy policy on about 9 in 10 items.
    for name in ("text", "vision"):
        items = [i for i in report["items"] if i["model"] == name]
        agree = sum(i["expected"]["unsafe"] == i["predicted"]["unsafe"] for i in items)
        print(f"eval {name}: {agree}/{len(items)} decisions agree")
        assert agree >= 0.8 * len(items), (name, agree, len(items))
