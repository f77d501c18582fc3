"""The ``moderation-worker`` command line (Typer). Each subcommand is a thin shell over one module."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from worker.config import ConfigError, Settings, load_settings

app = typer.Typer(
    name="moderation-worker",
    help="Streaming content moderation with Llama Guard 3 Vision (Kafka in, verdicts out).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (default: $MW_CONFIG, else built-in defaults)."),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _require_readable(file: str) -> None:
    """An input file that cannot be read ends every command the same way: one line, exit 2."""
    if file == "-":
        return
    try:
        with open(file, "rb"):
            pass
    except OSError as exc:
        typer.echo(f"error: cannot read {file}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from exc


def _preflight(check: Callable[[Settings], None], settings: Settings) -> None:
    """Run a command's startup checks; a missing dependency ends with one line naming its key, exit 2."""
    from worker.ops.preflight import StartupError

    try:
        check(settings)
    except StartupError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command("config")
def config_cmd(config: ConfigOption = None) -> None:
    """Print the effective configuration (YAML), secrets masked."""
    import yaml

    typer.echo(yaml.safe_dump(_settings(config).masked(), sort_keys=False))


@app.command("check-event")
def check_event_cmd(
    file: Annotated[str, typer.Argument(help="JSON object or JSON-lines file; - for stdin.")] = "-",
    config: ConfigOption = None,
) -> None:
    """Validate events; print each normalized event with its task, or its reason code and message.

    Exit status 0 only if every event is valid.
    """
    from worker.commands.check_event import check_events

    settings = _settings(config)
    _require_readable(file)
    raise typer.Exit(check_events(file, settings))


@app.command("prompt")
def prompt_cmd(
    file: Annotated[str, typer.Argument(help="One event (JSON); - for stdin.")] = "-",
    policy: Annotated[
        str | None, typer.Option(help="Policy id (default: the event's, else default_policy).")
    ] = None,
    family: Annotated[
        str | None,
        typer.Option(
            help="Llama Guard family whose prompt to print: llama-guard-3-vision | llama-guard-3-1b | "
            "llama-guard-3-8b | llama-guard-4 (default: model.family). Loads no weights."
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Print the exact prompt a Llama Guard model would read for an event (images as the template writes them)."""
    from worker.engine.prompt import prompt_command

    settings = _settings(config)
    _require_readable(file)
    raise typer.Exit(prompt_command(file, settings, policy_id=policy, family=family))


@app.command("dev-services")
def dev_services_cmd(
    action: Annotated[str, typer.Argument(help="up | down | status")],
    state_dir: Annotated[Path, typer.Option(help="Where ports, pids and logs are written.")] = Path(
        ".dev-services"
    ),
    kafka_port: Annotated[int, typer.Option(help="0 = a free port.")] = 0,
    redis_port: Annotated[int, typer.Option(help="0 = a free port.")] = 0,
) -> None:
    """Start/stop/inspect the embedded tansu broker and Redis server on 127.0.0.1."""
    from worker.dev.services import dev_services_command

    raise typer.Exit(dev_services_command(action, state_dir, kafka_port=kafka_port, redis_port=redis_port))


@app.command("build-tiny-model")
def build_tiny_model_cmd(
    out_dir: Annotated[Path | None, typer.Argument(help="Output directory (default: model.path).")] = None,
    train: Annotated[bool, typer.Option(help="Train on the toy policy after building.")] = True,
    force: Annotated[
        bool, typer.Option(help="Rebuild even if a checkpoint with this recipe exists.")
    ] = False,
    family: Annotated[
        str | None,
        typer.Option(
            help="Which tiny guard: llama-guard-3-vision (Mllama), llama-guard-3-1b / llama-guard-3-8b (one "
            "LlamaForCausalLM text guard serving both) or llama-guard-4 (Llama4ForConditionalGeneration); "
            "default: model.family."
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Build (offline, deterministically) and train a tiny guard checkpoint of a Llama Guard family for tests and the demo."""
    from worker.dev.tiny_model.build import build_tiny_model_command

    settings = _settings(config)
    raise typer.Exit(
        build_tiny_model_command(
            out_dir or Path(settings.model.path),
            train=train,
            force=force,
            family=family or settings.model.family,
        )
    )


@app.command("run")
def run_cmd(
    config: ConfigOption = None,
    ray: Annotated[
        bool, typer.Option("--ray", help="Run one GuardWorker actor per GPU on a Ray cluster.")
    ] = False,
) -> None:
    """Moderate the configured Kafka topic until SIGTERM/SIGINT (one process, or Ray actors with --ray)."""
    from worker.ops.preflight import check_run

    settings = _settings(config)
    _preflight(lambda s: check_run(s, on_ray=ray or s.ray.enabled), settings)
    if ray or settings.ray.enabled:
        from worker.runners.ray_fleet import run_on_ray

        raise typer.Exit(run_on_ray(settings))
    from worker.runners.local import run_worker

    raise typer.Exit(run_worker(settings))


@app.command("serve")
def serve_cmd(config: ConfigOption = None) -> None:
    """Start the Ray Serve HTTP endpoint (POST /v1/moderate, GET /healthz, GET /readyz)."""
    from worker.ops.preflight import check_serve
    from worker.serve.app import serve_command

    settings = _settings(config)
    _preflight(check_serve, settings)
    raise typer.Exit(serve_command(settings))


@app.command("demo")
def demo_cmd(
    events: Annotated[int, typer.Option(help="How many sample events to stream.")] = 400,
    ray: Annotated[bool, typer.Option(help="Run the worker as a Ray actor (the production shape).")] = True,
    config: ConfigOption = None,
) -> None:
    """Embedded broker + Redis + tiny model: stream sample events through the worker, show flagged results."""
    from worker.commands.demo import demo_command

    raise typer.Exit(demo_command(_settings(config), n_events=events, use_ray=ray))


@app.command("eval")
def eval_cmd(
    data: Annotated[Path, typer.Argument(help="Labelled JSON lines: an event plus its expected label.")],
    out_dir: Annotated[Path, typer.Option(help="Where the JSON report and PNG plots go.")] = Path(
        "eval-report"
    ),
    target_fpr: Annotated[
        float, typer.Option(help="Recommend a threshold for this false-positive rate.")
    ] = 0.05,
    strict: Annotated[
        bool, typer.Option(help="Fail on the first bad data line instead of skipping it.")
    ] = False,
    policy: Annotated[str | None, typer.Option(help="Policy id (default: default_policy).")] = None,
    config: ConfigOption = None,
) -> None:
    """Precision/recall/F1/FPR per task and per-category F1 (the model card's tables) on labelled data."""
    from worker.evaluation.run import eval_command

    raise typer.Exit(
        eval_command(
            data, _settings(config), out_dir=out_dir, target_fpr=target_fpr, strict=strict, policy_id=policy
        )
    )


MODEL_HINT = (
    "build the tiny demo checkpoint there with `moderation-worker build-tiny-model`, or point model.path "
    "(MW_MODEL__PATH) at Llama Guard 3 Vision weights"
)


def main() -> None:
    """Console-script entry point. Configuration faults end with one clear line and exit status 2."""
    try:
        app(prog_name="moderation-worker")
    except Exception as exc:
        from worker.engine.loading import ModelLoadError  # imported only on failure (pulls in torch)

        if isinstance(exc, ModelLoadError):
            typer.echo(f"error: {exc}\nhint: {MODEL_HINT}", err=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    sys.exit(main())
