"""``moderation-worker prompt FILE|-``: the exact prompt for one event, or exit 1 with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.config import load_settings
from worker.contracts.events import Turn
from worker.engine.policy import DEFAULT_POLICY
from worker.engine.prompt import prompt_command, render_prompt

PNG_1PX = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


def write_event(tmp_path: Path, event: dict) -> Path:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))
    return path


def test_prints_the_exact_prompt_with_the_image_marker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    event = {
        "event_id": "e1",
        "conversation_id": "c1",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": " What is this? "},
                    {"type": "image_url", "image_url": {"url": PNG_1PX}},
                ],
            },
            {"role": "assistant", "content": "A tiny dot."},
        ],
    }
    assert prompt_command(str(write_event(tmp_path, event)), load_settings()) == 0
    expected = render_prompt(
        (Turn("user", ("What is this?",)), Turn("assistant", ("A tiny dot.",))),
        DEFAULT_POLICY,
        has_image=True,
    )
    out = capsys.readouterr().out
    assert out == expected + "\n"
    assert "<|image|> Task: Check if there is unsafe content in 'Agent' messages" in out


def test_uses_the_requested_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.config import PolicySettings

    settings = load_settings(
        policies={"default": PolicySettings(), "short": PolicySettings(categories=["S9"])}
    )
    event = {"event_id": "e1", "conversation_id": "c1", "messages": [{"role": "user", "content": "hi"}]}
    assert prompt_command(str(write_event(tmp_path, event)), settings, policy_id="short") == 0
    assert (
        "<BEGIN UNSAFE CONTENT CATEGORIES>\nS9: Indiscriminate Weapons.\n<END UNSAFE CONTENT CATEGORIES>"
        in capsys.readouterr().out
    )


def test_invalid_event_exits_1_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    event = {"event_id": "e1", "conversation_id": "c1", "messages": []}
    assert prompt_command(str(write_event(tmp_path, event)), load_settings()) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "invalid event:" in captured.err


def test_unknown_policy_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    event = {"event_id": "e1", "conversation_id": "c1", "messages": [{"role": "user", "content": "hi"}]}
    assert prompt_command(str(write_event(tmp_path, event)), load_settings(), policy_id="nope") == 1
    assert "unknown_policy" in capsys.readouterr().err


def test_missing_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert prompt_command(str(tmp_path / "missing.json"), load_settings()) == 1
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("family", "start", "s14"),
    [
        ("llama-guard-3-1b", "<|begin_of_text|><|start_header_id|>user", False),
        ("llama-guard-3-8b", " <|begin_of_text|><|start_header_id|>user", True),
        ("llama-guard-4", "<|begin_of_text|><|header_start|>user", True),
    ],
)
def test_family_flag_prints_that_family_s_prompt_without_weights(
    tmp_path: Path, family: str, start: str, s14: bool
) -> None:
    import subprocess
    import sys

    event = {"event_id": "e1", "conversation_id": "c1", "messages": [{"role": "user", "content": "hi"}]}
    path = write_event(tmp_path, event)
    # A model.path that does not exist: the command must not need weights.
    done = subprocess.run(
        [sys.executable, "-m", "worker", "prompt", "--family", family, str(path)],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "MW_MODEL__PATH": str(tmp_path / "no-weights-here")},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(start)
    assert ("S14: Code Interpreter Abuse." in done.stdout) is s14


def test_lg4_prints_one_image_token_per_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    event = {
        "event_id": "e1",
        "conversation_id": "c1",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": PNG_1PX}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    }
    assert prompt_command(str(write_event(tmp_path, event)), load_settings(), family="llama-guard-4") == 0
    out = capsys.readouterr().out
    assert "User: <|image|>What is this?\\n\\n\n\n<END CONVERSATION>" in out
    assert "S14" not in out  # the template drops Code Interpreter Abuse for image conversations


def test_text_family_refuses_an_image_event(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    event = {
        "event_id": "e1",
        "conversation_id": "c1",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "x"},
                    {"type": "image_url", "image_url": {"url": PNG_1PX}},
                ],
            }
        ],
    }
    assert prompt_command(str(write_event(tmp_path, event)), load_settings(), family="llama-guard-3-1b") == 1
    assert "reads no images" in capsys.readouterr().err


def test_unknown_family_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    event = {"event_id": "e1", "conversation_id": "c1", "messages": [{"role": "user", "content": "hi"}]}
    assert prompt_command(str(write_event(tmp_path, event)), load_settings(), family="llama-guard-9") == 2
    assert "known: llama-guard-3-vision" in capsys.readouterr().err
