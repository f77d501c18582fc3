"""JSON log lines carry ts/level/logger/msg and the event's coordinates, never message text."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from worker.config import LoggingSettings
from worker.contracts.rejections import Reason
from worker.ops.logs import configure_logging

SECRET_TEXT = "how do I build a bomb"


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, LoggingSettings]]:
    """Yields (stream, settings); restores the root logger afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stream = io.StringIO()
    yield stream, LoggingSettings()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_the_standard_fields_and_the_event_coordinates(captured) -> None:
    stream, settings = captured
    configure_logging(settings, worker="gpu-0", stream=stream)
    logging.getLogger("worker.stream.pipeline").warning(
        "dead letter published",
        extra={"event_id": "evt-1", "stage": "decode", "reason": Reason.INVALID_JSON, "partition": 2},
    )
    (line,) = _lines(stream)
    assert list(line)[:8] == ["ts", "level", "logger", "msg", "event_id", "stage", "reason", "worker"]
    assert line["level"] == "WARNING"
    assert line["logger"] == "worker.stream.pipeline"
    assert line["msg"] == "dead letter published"
    assert (line["event_id"], line["stage"], line["reason"], line["worker"]) == (
        "evt-1",
        "decode",
        "invalid_json",
        "gpu-0",
    )
    assert line["partition"] == 2
    assert str(line["ts"]).endswith("Z")


def test_message_text_passed_as_extra_never_reaches_the_line(captured) -> None:
    stream, settings = captured
    configure_logging(settings, stream=stream)
    logging.getLogger("x").info(
        "classified",
        extra={
            "event_id": "evt-2",
            "text": SECRET_TEXT,
            "messages": [{"content": SECRET_TEXT}],
            "event": {"messages": [{"role": "user", "content": SECRET_TEXT}]},
        },
    )
    assert SECRET_TEXT not in stream.getvalue()
    assert _lines(stream)[0]["event_id"] == "evt-2"


def test_include_content_debug_option_lets_content_through(captured) -> None:
    stream, _ = captured
    configure_logging(LoggingSettings(include_content=True), stream=stream)
    logging.getLogger("x").info("prompt", extra={"event_id": "evt-3", "text": SECRET_TEXT})
    assert _lines(stream)[0]["text"] == SECRET_TEXT


def test_level_setting_filters_and_reconfiguring_does_not_duplicate_lines(captured) -> None:
    stream, _ = captured
    configure_logging(LoggingSettings(level="WARNING"), stream=stream)
    configure_logging(LoggingSettings(level="WARNING"), stream=stream)
    logging.getLogger("x").info("hidden")
    logging.getLogger("x").error("shown")
    assert [line["msg"] for line in _lines(stream)] == ["shown"]


def test_exceptions_are_logged_with_their_type(captured) -> None:
    stream, settings = captured
    configure_logging(settings, stream=stream)
    try:
        raise TimeoutError("redis")
    except TimeoutError:
        logging.getLogger("x").exception("cache down", extra={"stage": "cache"})
    (line,) = _lines(stream)
    assert line["exc_type"] == "TimeoutError" and "Traceback" in str(line["exc"])


def test_text_format_is_one_readable_line_with_key_values(captured) -> None:
    stream, _ = captured
    configure_logging(LoggingSettings(format="text"), worker="w1", stream=stream)
    logging.getLogger("x").warning("dead letter", extra={"event_id": "evt-4", "reason": Reason.TEXT_TOO_LONG})
    text = stream.getvalue().strip()
    assert " WARNING x: dead letter event_id=evt-4 reason=text_too_long worker=w1" in text
    assert "\n" not in text


def test_loading_and_running_the_engine_writes_only_json_lines_to_stderr(untrained_model_dir):
    """No tqdm "Loading weights" bars, no raw FutureWarnings: every stderr line is a JSON log line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import warnings
warnings.simplefilter("default")
from worker.config import load_settings
from worker.ops.logs import configure_logging
from worker.engine.engine import GuardEngine
from worker.engine.types import GuardRequest
from worker.contracts.events import Turn
from PIL import Image
settings = load_settings(None, model__path={str(untrained_model_dir)!r}, model__device="cpu")
configure_logging(settings.logging)
engine = GuardEngine.from_settings(settings)
policy = engine.policy_for(None)
turns = (Turn("user", ("hello there",)),)
engine.classify([GuardRequest(turns=turns, policy=policy, image=None)] * 2)
engine.classify([GuardRequest(turns=turns, policy=policy, image=Image.new("RGB", (64, 64)))])
"""
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")} | {"PYTHONPATH": str(repo)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert line.startswith("{") and json.loads(line)["level"], line
        assert "deprecated" not in line, line  # the engine uses the supported cache API
