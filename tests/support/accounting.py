"""Reliability accounting: did every input record end as a verdict or a dead letter, and how many twice?

An input record is identified by its source coordinates (partition, offset), which every verdict and dead
letter carries. "Lost" = an input offset with neither; "duplicates" = answers beyond the first (allowed by
at-least-once delivery, and counted).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.kafka_io import end_offsets, read_json
from worker.config import Settings


@dataclass
class Accounting:
    inputs: int
    verdicts: int
    dead_letters: int
    lost: list[tuple[int, int]]
    duplicates: int

    def line(self) -> str:
        return (
            f"events {self.inputs}, verdicts {self.verdicts}, dead letters {self.dead_letters}, "
            f"lost {len(self.lost)}, duplicates {self.duplicates}"
        )


def account(settings: Settings, *, timeout_s: float = 60.0) -> Accounting:
    """Compare the events topic with what the verdicts and DLQ topics hold."""
    marks = end_offsets(settings, settings.topics.events, timeout_s=timeout_s)
    verdicts = read_json(settings, settings.topics.verdicts, timeout_s=timeout_s)
    dead = read_json(settings, settings.topics.dlq, timeout_s=timeout_s)
    answers = Counter(
        (r["source"]["partition"], r["source"]["offset"]) for r in verdicts + dead if r.get("source")
    )
    expected = [(p, o) for p, end in marks.items() for o in range(end)]
    lost = [po for po in expected if answers[po] == 0]
    duplicates = sum(n - 1 for po, n in answers.items() if n > 1)
    return Accounting(len(expected), len(verdicts), len(dead), lost, duplicates)


def wait_until_answered(
    settings: Settings, total: int, *, timeout_s: float, poll_s: float = 2.0
) -> Accounting:
    """Poll the accounting until every one of ``total`` inputs is answered (or the deadline passes)."""
    deadline = time.monotonic() + timeout_s
    result = account(settings)
    while (result.inputs < total or result.lost) and time.monotonic() < deadline:
        time.sleep(poll_s)
        result = account(settings)
    return result


def write_config(settings: Settings, path: Path) -> Path:
    """The settings as a YAML file the worker subprocess reads with --config."""
    data = settings.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class WorkerProcess:
    """``moderation-worker run`` as a real subprocess (what an operator runs), with its log kept."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MW_")}
        self._log_fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--config", str(self.config)],
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, no flush — the crash case."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float) -> tuple[int, float]:
        """SIGTERM and wait; returns (exit code, seconds it took)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            code = -9
        return code, time.monotonic() - started

    def close(self) -> None:
        if self.alive:
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait(timeout=30)  # type: ignore[union-attr]
        if hasattr(self, "_log_fh"):
            self._log_fh.close()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def env_int(name: str, default: int) -> int:
    """A size knob for CI vs. local runs (e.g. MW_RELIABILITY_EVENTS)."""
    return int(os.environ.get(name, default))


def report(figures: dict[str, Any], line: str) -> None:
    """Record a figure line for the terminal summary (see conftest)."""
    figures.setdefault("lines", []).append(line)
