"""The image: a HEALTHCHECK on the worker's health endpoint, Ray at the chart's version, code not writable.

Parsed with ``dockerfile`` (Docker's own parser, from buildkit) rather than regular expressions.
"""

from __future__ import annotations

import re

import dockerfile
import pytest
import yaml

from tests.ops.helpers import CHART_DIR, REPO
from worker.config import Settings

DOCKERFILE = REPO / "docker" / "Dockerfile"


@pytest.fixture(scope="module")
def instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def _runtime_stage(instructions: list[dockerfile.Command]) -> list[dockerfile.Command]:
    starts = [i for i, c in enumerate(instructions) if c.cmd == "FROM"]
    (runtime,) = [i for i in starts if instructions[i].value[-1] == "runtime"]
    return instructions[runtime:]


def _global_args(instructions: list[dockerfile.Command]) -> dict[str, str]:
    first_from = next(i for i, c in enumerate(instructions) if c.cmd == "FROM")
    return dict(
        c.value[0].split("=", 1) for c in instructions[:first_from] if c.cmd == "ARG" and "=" in c.value[0]
    )


def test_the_image_has_a_healthcheck_on_the_workers_liveness_endpoint(instructions) -> None:
    (check,) = [c for c in _runtime_stage(instructions) if c.cmd == "HEALTHCHECK"]
    command = " ".join(check.value)
    assert check.value[0] == "CMD"
    assert f"${{MW_OPS__PORT:-{Settings().ops.port}}}/healthz" in command
    assert any(flag.startswith("--start-period=") for flag in check.flags)  # model loading takes a while


def test_ray_is_pinned_to_the_version_the_chart_runs(instructions) -> None:
    chart_version = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["rayVersion"]
    assert _global_args(instructions)["RAY_VERSION"] == chart_version
    installs = " ".join(" ".join(c.value) for c in _runtime_stage(instructions) if c.cmd == "RUN")
    assert '"ray[serve]==${RAY_VERSION}"' in installs
    import ray

    assert ray.__version__ == chart_version, "the test environment runs another Ray than the image and chart"


def test_code_is_root_owned_and_the_container_runs_as_a_non_root_user(instructions) -> None:
    stage = _runtime_stage(instructions)
    users = [c for c in stage if c.cmd == "USER"]
    assert users, "the runtime stage never leaves root"
    uid = users[-1].value[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it
    for command in stage:
        if command.cmd in ("COPY", "ADD"):
            assert not any(f.startswith("--chown") for f in command.flags), command.original
    for command in instructions:
        if command.cmd == "RUN":
            assert not re.search(r"chown\s+\S+\s+.*?/app\b", " ".join(command.value)), command.original
    # Nothing after USER copies or installs code (it would be owned by the same root, but say it plainly).
    after_user = stage[stage.index(users[-1]) :]
    assert not [c for c in after_user if c.cmd in ("COPY", "ADD", "RUN")]
