"""``moderation-worker check-event`` as a user runs it: a real subprocess, real files, exit codes 0/1/2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from tests.contracts.malformed_events import CASES, raw
from worker.contracts import SCHEMAS_DIR

CLI = Path(sys.executable).with_name("moderation-worker")
VALID_EXAMPLES = sorted((SCHEMAS_DIR / "examples" / "chat_event" / "valid").glob("*.json"))


def check_event(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script with an empty environment config."""
    return subprocess.run(
        [str(CLI), "check-event", *args],
        check=False,
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )


def test_valid_examples_as_json_lines_pass_with_exit_0(tmp_path: Path) -> None:
    lines = [orjson.dumps(orjson.loads(p.read_bytes())) for p in VALID_EXAMPLES]
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join([lines[0], b"", *lines[1:]]) + b"\n")
    result = check_event(str(events))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert len(out) == len(lines) + 1
    first = out[0].split(" ", 5)
    assert first[:5] == [
        "OK",
        "evt-0005",
        "task=prompt",
        "turns=1",
        "image=no",
    ]  # consecutive_user_messages.json
    normalized = orjson.loads(first[5])
    assert normalized["merged_messages"] == 1 and normalized["turns"][0]["texts"] == [
        "first part of my question",
        "second part",
    ]
    assert out[-1] == f"checked {len(lines)} event(s): {len(lines)} valid, 0 invalid"
    image_lines = [line for line in out if "image=yes" in line]
    assert len(image_lines) == 2


def test_pretty_printed_single_event_from_stdin() -> None:
    result = check_event(
        "-", stdin=(SCHEMAS_DIR / "examples/chat_event/valid/response_with_history.json").read_bytes()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK evt-0002 task=response turns=4 image=no {")
    assert '"dropped_messages":2' in result.stdout


def test_malformed_events_are_each_reported_with_their_line_reason_and_field(tmp_path: Path) -> None:
    cases = [c for c in CASES if not c.settings and c.record and b"\n" not in c.record]
    assert len(cases) >= 25
    records = [raw(), *[c.record for c in cases]]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(r for r in records if r is not None) + b"\n")
    result = check_event(str(path))
    assert result.returncode == 1
    out = result.stdout.splitlines()
    assert out[0].startswith("OK evt-1 task=prompt turns=1 image=no ")
    for line_no, (case, line) in enumerate(zip(cases, out[1:], strict=False), start=2):
        prefix = f"INVALID line {line_no}: {case.reason}: "
        assert line.startswith(prefix), (case.name, line)
        if case.field:
            assert case.field in line, (case.name, line)
    assert out[-1].startswith(f"checked {len(records)} event(s): 1 valid, {len(cases)} invalid (")


def test_unreadable_file_exits_2() -> None:
    result = check_event("/nonexistent/events.jsonl")
    assert result.returncode == 2
    assert "cannot read /nonexistent/events.jsonl" in result.stderr


def test_a_file_without_events_is_not_a_success(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    result = check_event(str(empty))
    assert result.returncode == 1
    assert "checked 0 event(s)" in result.stdout
