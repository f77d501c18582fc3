"""``moderation-worker check-event`` as a user runs it: a real subprocess, real files, exit codes 0/1/2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from tests.contracts.malformed_events import CASES, raw
from worker.contracts.schemas import SCHEMAS_DIR

REPO = Path(__file__).resolve().parents[2]
VALID_EXAMPLES = sorted((SCHEMAS_DIR / "examples" / "chat_event" / "valid").glob("*.json"))


def check_event(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command (this tree's code) with an empty environment config."""
    return subprocess.run(
        [sys.executable, "-m", "worker", "check-event", *args],
        check=False,
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(REPO)},
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


def _event(event_id: str, image_url: str | None = None) -> dict:
    content: list[dict] = [{"type": "text", "text": "what is this?"}]
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    return {
        "event_id": event_id,
        "conversation_id": "c",
        "created_at": "2026-12-01T00:00:00Z",
        "messages": [{"role": "user", "content": content}],
    }


def _jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _data_url(data: bytes, media_type: str) -> str:
    import base64

    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def test_images_the_worker_rejects_offline_are_rejected_with_its_reason_and_field(tmp_path: Path) -> None:
    from worker.config import load_settings
    from worker.contracts.decode import decode_event
    from worker.contracts.rejections import RejectedError
    from worker.images.load import decode_image, image_bytes

    jpeg = _jpeg()
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"/>'
    events = [
        _event("truncated", _data_url(jpeg[: len(jpeg) // 2], "image/jpeg")),
        _event("svg", _data_url(svg, "image/svg+xml")),
        _event("metadata", "http://169.254.169.254/latest/meta-data/"),
        _event("fine", _data_url(jpeg, "image/jpeg")),
    ]
    path = tmp_path / "images.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    result = check_event(str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout.splitlines()
    field = "messages[0].content[1].image_url.url"
    assert out[0].startswith(f"INVALID line 1: image_undecodable: {field}: ")
    assert out[1].startswith(
        f"INVALID line 2: image_bad_content_type: {field} has media type 'image/svg+xml'"
    )
    assert out[2].startswith(f"INVALID line 3: image_blocked_address: {field}: ")
    assert out[3].startswith("OK fine ")
    # The stream's own steps give the same reasons: decoding the record refuses the media type (as above);
    # image_bytes in the fetch pool and decode_image in prepare refuse the truncated image.
    settings = load_settings()
    svg_rejection = decode_event(orjson.dumps(events[1]), settings)
    assert (
        getattr(svg_rejection, "reason", None) is not None
        and svg_rejection.reason.value == "image_bad_content_type"
    )
    for event, expected in zip(events[:1], ["image_undecodable"], strict=True):
        decoded = decode_event(orjson.dumps(event), settings)
        try:
            decode_image(image_bytes(decoded.image, settings), settings.limits)
        except RejectedError as exc:
            assert exc.rejection.reason.value == expected
        else:
            raise AssertionError(f"the stream accepted {event['event_id']}")


def test_a_json_array_of_events_is_checked_item_by_item(tmp_path: Path) -> None:
    bad = _event("bad")
    bad["messages"][0]["role"] = "robot"
    path = tmp_path / "batch.json"
    path.write_bytes(orjson.dumps([_event("a"), bad, _event("c")], option=orjson.OPT_INDENT_2))
    result = check_event(str(path))
    assert result.returncode == 1
    out = result.stdout.splitlines()
    assert out[0].startswith("OK a ") and out[2].startswith("OK c ")
    assert out[1].startswith("INVALID item 1: unknown_role: ")
    assert out[-1].startswith("checked 3 event(s): 2 valid, 1 invalid")


def test_several_pretty_printed_events_in_one_file_are_one_record_each(tmp_path: Path) -> None:
    path = tmp_path / "pretty.json"
    path.write_bytes(
        orjson.dumps(_event("a"), option=orjson.OPT_INDENT_2)
        + b"\n\n"
        + orjson.dumps(_event("b"), option=orjson.OPT_INDENT_2)
        + b"\n"
    )
    result = check_event(str(path))
    assert result.returncode == 0, result.stdout
    out = result.stdout.splitlines()
    assert [line.split()[:2] for line in out[:2]] == [["OK", "a"], ["OK", "b"]]
    assert out[-1] == "checked 2 event(s): 2 valid, 0 invalid"


def test_a_missing_file_is_exit_2_with_one_line_in_check_event_and_prompt(tmp_path: Path) -> None:
    for command in ("check-event", "prompt"):
        result = subprocess.run(
            [sys.executable, "-m", "worker", command, str(tmp_path / "missing.json")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(REPO)},
        )
        assert result.returncode == 2, (command, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "missing.json" in result.stderr


def test_an_unsupported_schema_version_says_which_versions_are_supported() -> None:
    from worker.config import load_settings
    from worker.contracts.decode import decode_event

    event = _event("v2")
    event["schema_version"] = 2
    rejection = decode_event(orjson.dumps(event), load_settings())
    assert rejection.reason.value == "invalid_value" and rejection.field == "schema_version"
    assert rejection.message == "schema_version has an unsupported value 2; supported: 1"


def test_nesting_too_deep_to_parse_is_too_deeply_nested_for_records_and_http_batches() -> None:
    from worker.config import load_settings
    from worker.contracts.decode import decode_event
    from worker.serve.http_contract import parse_request

    settings = load_settings()
    for depth in (40, 100_000):
        nested_objects = b'{"a":' * depth + b"1" + b"}" * depth
        assert decode_event(nested_objects, settings).reason.value == "too_deeply_nested", depth
    deep_array = b"[" * 100_000 + b"]" * 100_000
    (error,) = parse_request(deep_array, settings).errors
    assert (error.reason, error.status) == ("too_deeply_nested", 400)
