"""The one typed settings object every part of the worker reads.

Loaded from a YAML file (``--config FILE`` or ``MW_CONFIG``) and overridden by environment variables
``MW_<SECTION>__<KEY>`` (e.g. ``MW_REDIS__ENABLED=false``; mappings as JSON, lists as JSON or
comma-separated: ``MW_KAFKA__BOOTSTRAP_SERVERS=broker-1:9092,broker-2:9092``).
Precedence, highest first: explicit overrides passed in code, environment, YAML file, defaults.
Defaults run against the embedded services (``moderation-worker dev-services up``).

Unknown keys and bad values fail at start with one line naming the key's dotted name (pydantic
``extra="forbid"``); an ``MW_<SECTION>__<KEY>`` variable whose section or key does not exist is such an
unknown key too (variables without ``__`` that name no top-level key are left alone: test knobs share the
prefix). Credentials inside URL settings (``redis://user:password@host``) are masked wherever the
configuration is printed (``Settings.masked``) or logged (``mask_url_credentials``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

CATEGORY_CODES: tuple[str, ...] = tuple(f"S{i}" for i in range(1, 14))
# Every built-in code of any Llama Guard family (S14 only in Llama Guard 3 8B and Llama Guard 4).
BUILTIN_CATEGORY_CODES: tuple[str, ...] = tuple(f"S{i}" for i in range(1, 15))
GUARD_FAMILIES: tuple[str, ...] = (
    "llama-guard-3-vision",
    "llama-guard-3-1b",
    "llama-guard-3-8b",
    "llama-guard-4",
)

# The category names of OpenAI's moderation API (worker/serve/openai_compat.py maps the codes onto them).
OPENAI_CATEGORY_NAMES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
ENV_PREFIX = "MW_"
DEFAULT_MODEL_PATH = "~/.cache/moderation-worker/tiny-guard"  # what `build-tiny-model` writes by default


MASK = "**********"  # what SecretStr dumps as; URL passwords are replaced by the same
# ``scheme://user:password@`` (or ``scheme://:password@`` / ``scheme://token@``) inside any text.
_URL_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(?::(?P<pw>[^/@\s]*))?@"
)


def mask_url_credentials(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it replaced by ``**********``.

    A userinfo without a password (``redis://token@host``) is itself the secret and is masked whole.
    """

    def _mask(match: re.Match[str]) -> str:
        if match.group("pw") is None:
            return f"{match.group('scheme')}{MASK}@"
        return f"{match.group('scheme')}{match.group('user')}:{MASK}@"

    return _URL_USERINFO.sub(_mask, text) if "://" in text else text


def _comma_list(value: Any) -> Any:
    """A list setting written as one string: JSON (``["a:1","b:2"]``) or comma-separated (``a:1,b:2``)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ValueError(
                f"not a JSON list ({exc.msg}); write a JSON list or comma-separated values"
            ) from None
    return [part.strip() for part in text.split(",") if part.strip()]


# A list of strings that also accepts "a,b,c" (the form people write in environment variables).
StrList = Annotated[list[str], NoDecode, BeforeValidator(_comma_list)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaSettings(Section):
    """Broker connection, consumer group and producer tuning (kafka-python names)."""

    client: Literal["kafka-python", "confluent-kafka"] = Field(
        "kafka-python",
        description="the Kafka client library of the stream: kafka-python (pure Python) or confluent-kafka "
        "(librdkafka, a faster cache-hit path; the `confluent` extra). Same settings, same delivery rule",
    )
    bootstrap_servers: StrList = ["127.0.0.1:9092"]
    client_id: str = "moderation-worker"
    group_id: str = "moderation-worker"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    partition_assignment_strategy: Literal["range", "roundrobin", "cooperative-sticky"] | None = Field(
        None,
        description="the group's partition assignor; cooperative-sticky rebalances incrementally. "
        "Default: the client's own (range, then roundrobin)",
    )
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(2000, ge=100)
    max_poll_interval_ms: int = Field(300_000, ge=1000)
    max_poll_records: int = Field(256, ge=1)
    fetch_max_bytes: int = Field(52_428_800, ge=1024)
    max_partition_fetch_bytes: int = Field(1_048_576, ge=1024)
    request_timeout_ms: int = Field(30_000, ge=1000)
    retry_backoff_ms: int = Field(100, ge=0)
    # Producer
    acks: Literal["all", "1", "0"] = "all"
    enable_idempotence: bool = True
    compression_type: Literal["none", "gzip", "lz4", "zstd"] = "lz4"
    linger_ms: int = Field(5, ge=0)
    batch_size: int = Field(65_536, ge=1024)
    delivery_timeout_ms: int = Field(120_000, ge=1000)


class TopicSettings(Section):
    """Input and output topics."""

    events: str = "chat.events"
    flagged: str = "moderation.flagged"
    verdicts: str = "moderation.verdicts"
    dlq: str = "moderation.dlq"
    review: str = Field(
        "moderation.review",
        description="verdicts in a policy's human-review band (review_threshold <= score < threshold)",
    )
    publish_all_verdicts: bool = True


class BatchingSettings(Section):
    """Micro-batching and backpressure."""

    max_size: int = Field(32, ge=1, le=4096)
    max_wait_ms: int = Field(50, ge=0)
    max_in_flight: int = Field(1024, ge=1, description="pause partitions above this many in-flight events")
    resume_below: int | None = Field(None, ge=0, description="resume below this; default max_in_flight // 2")
    prepare_threads: int = Field(
        2, ge=1, le=64, description="threads for image fetch/decode and tokenization"
    )
    prepare_processes: int | None = Field(
        None,
        ge=0,
        le=64,
        description="processes that prepare image batches (decode, the model's image processor, tokenization) "
        "beside the worker process, so that work never holds the model thread's GIL; each loads the "
        "processor only, never the weights; N = N processes, started with the worker; 0 = on the "
        "prepare_threads, in the worker process; None = one process when a model reads images and the worker "
        "has at least 2 usable cores, started in the background on the first image backlog (the threads "
        "prepare until it is up)",
    )
    prepare_timeout_s: float = Field(
        120.0,
        gt=0,
        description="with prepare_processes: a batch not prepared within this is treated as a hung preparation "
        "process (it is restarted and the batch isolated item by item, poison becoming dead letters)",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="torch intra-op threads for the model's CPU work; None = the cores left after the "
        "preparation threads (or prepare_processes when set; at least 1), so preparing images never "
        "oversubscribes the cores the model runs on",
    )
    intake_processes: int = Field(
        1,
        ge=0,
        le=64,
        description="processes that decode, route and key text events and publish the verdicts of the "
        "verdict-cache hits among them on a producer of their own, off the loop thread's GIL (the hit path then "
        "scales with cores; offsets are still committed by the worker, after the broker's acks); started on the "
        "first burst of records, used while most records they get are answered there; 0 = the loop thread does "
        "it all",
    )
    mix_modalities: bool = Field(
        False,
        description="let text-only and image items share a batch for a model whose engine computes mixed batches "
        "exactly (fewer, fuller batches); off by default: a mixed pass runs text rows through the "
        "cross-attention layers and pads them to the image rows, slower per item on the tiny CPU guard",
    )
    length_lookahead: int = Field(
        4,
        ge=1,
        le=64,
        description="group similar lengths: a model's queue may hold up to max_size x this many distinct "
        "items (never past max_wait_ms) and batches similar-length ones together, so forward passes compute "
        "little padding; 1 = strict arrival order (a batch leaves as soon as it holds max_size)",
    )

    @model_validator(mode="after")
    def _resume_below_bound(self) -> BatchingSettings:
        if self.resume_below is not None and self.resume_below >= self.max_in_flight:
            raise ValueError("batching.resume_below must be lower than batching.max_in_flight")
        return self


CUSTOM_CATEGORY_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"


class BlocklistSettings(Section):
    """One blocklist: exact terms and RE2 patterns, matched on case- and confusable-folded text."""

    terms: list[str] = Field([], description="exact terms (substring match after normalisation)")
    patterns: list[str] = Field(
        [], description="RE2 regular expressions (linear time; matched after normalisation)"
    )
    category: str = Field(
        ...,
        description="what a hit means: an S-code (S1..S13) or a custom category id (lowercase, e.g. spam)",
    )
    name: str | None = Field(None, description="category name shown in verdicts; default: the policy's name")
    action: Literal["halt", "annotate"] = Field(
        "halt", description="halt = the hit decides unsafe without a model call; annotate = only reported"
    )

    @field_validator("category")
    @classmethod
    def _category_code(cls, category: str) -> str:

        if category not in CATEGORY_CODES and not re.fullmatch(CUSTOM_CATEGORY_PATTERN, category):
            raise ValueError(
                f"{category!r} is neither S1..S13 nor a custom id matching {CUSTOM_CATEGORY_PATTERN}"
            )
        return category

    @model_validator(mode="after")
    def _not_empty(self) -> BlocklistSettings:
        if not self.terms and not self.patterns:
            raise ValueError("a blocklist needs terms or patterns")
        return self


class PolicySettings(Section):
    """One moderation policy: which categories count, their wording, and the decision threshold."""

    categories: StrList | None = Field(
        None,
        description="built-in codes that count; None = all of the judging model's built-ins (S1..S13 for "
        "Llama Guard 3 1B/Vision, S1..S14 for Llama Guard 3 8B and 4)",
    )
    names: dict[str, str] = Field({}, description="rewording of built-in categories: code -> name")
    custom_categories: dict[str, str] = Field(
        {},
        description="the policy's own categories: new code after the model's built-ins (S14, S15, ...) -> its "
        "text; listed after the built-ins in the prompt and carried with their text in verdicts",
    )
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    review_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="scores in [review_threshold, threshold) stay safe but are marked review: true and also go "
        "to topics.review; None = no review band",
    )
    blocklists: dict[str, BlocklistSettings] = Field(
        {}, description="named blocklists matched before the model (terms and RE2 patterns)"
    )

    @field_validator("categories")
    @classmethod
    def _known_codes(cls, codes: list[str] | None) -> list[str] | None:
        if codes is None:
            return None
        unknown = [c for c in codes if c not in BUILTIN_CATEGORY_CODES]
        if unknown:
            raise ValueError(
                f"unknown category codes {unknown}; built-in codes are S1..S14 (custom ones go under "
                "custom_categories)"
            )
        if not codes:
            raise ValueError("a policy needs at least one category")
        return codes

    @field_validator("names")
    @classmethod
    def _known_name_codes(cls, names: dict[str, str]) -> dict[str, str]:
        unknown = [c for c in names if c not in BUILTIN_CATEGORY_CODES]
        if unknown:
            raise ValueError(
                f"names for unknown category codes {unknown} (custom ones go under custom_categories)"
            )
        return names

    @field_validator("custom_categories")
    @classmethod
    def _custom_codes(cls, custom: dict[str, str]) -> dict[str, str]:
        bad = [c for c in custom if not re.fullmatch(r"S[1-9][0-9]{0,2}", c) or int(c[1:]) < 14]
        if bad:
            raise ValueError(
                f"custom category codes {bad} must be S14 or above (S<number>, after the built-ins)"
            )
        return custom

    @model_validator(mode="after")
    def _review_below_threshold(self) -> PolicySettings:
        if self.review_threshold is not None and self.review_threshold >= self.threshold:
            raise ValueError(
                f"review_threshold {self.review_threshold} must be below the decision threshold {self.threshold}"
            )
        return self


class ModelSettings(Section):
    """Where one guard model's weights come from, which Llama Guard family they are, and how they run."""

    family: Literal["llama-guard-3-vision", "llama-guard-3-1b", "llama-guard-3-8b", "llama-guard-4"] = Field(
        "llama-guard-3-vision",
        description="which Llama Guard model the weights are: sets the prompt format, built-in categories, "
        "modalities and architecture (llama-guard-3-vision | llama-guard-3-1b | llama-guard-3-8b | llama-guard-4)",
    )
    path: str = Field(
        DEFAULT_MODEL_PATH,
        description="local directory or hub id for from_pretrained (`~` expands); production: the real weights",
        validate_default=True,
    )
    revision: str | None = None
    model_id: str | None = Field(
        None, description="id reported in verdicts; default: the path's last component"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    mode: Literal["single_pass", "generate"] = "single_pass"
    max_new_tokens: int = Field(
        10,
        ge=1,
        le=64,
        description="decoding budget: whole answer (generate mode) or the codes after 'unsafe'",
    )
    share_prompt_prefix: bool = Field(
        True,
        description="compute once the prompt start that rows share and reuse its keys/values (exact): text-only "
        "rows share their policy's instructions and categories (per task); image rows, only with "
        "reference_cross_attention, the tokens before <|image|> (on Vision's template just the header)",
    )
    reference_cross_attention: bool = Field(
        True,
        description="Llama Guard 3 Vision: mask the cross-attention output of tokens that see no image, as Meta's "
        "reference does (transformers masks only the MLP branch); makes text-only and image rows exact in one "
        "batch. Loading refuses a transformers release whose Mllama layer the patch was not checked against",
    )
    answer_prefix: str | None = Field(
        None,
        description="whitespace the model emits after the assistant header before safe/unsafe (Llama Guard 3: "
        "'\\n\\n'); None = detect it at load from the checkpoint's greedy output",
    )
    local_files_only: bool = True
    hf_token: SecretStr | None = None
    optimized_languages: list[str] = Field(
        ["en"],
        description="ISO 639-1 codes the model is optimized for; verdicts say whether the judged text's detected "
        "language is among them (Llama Guard 3 Vision: English)",
    )

    @field_validator("path")
    @classmethod
    def _expand_home(cls, path: str) -> str:
        return os.path.expanduser(path) if path.startswith("~") else path


# -- several guard models: the named models, which one judges which event, and pools of workers -------------

MODEL_FAMILIES: tuple[str, ...] = (
    "llama-guard-3-vision",
    "llama-guard-3-1b",
    "llama-guard-3-8b",
    "llama-guard-4",
)
DEFAULT_MODEL_NAME = "default"  # the name the single ``model:`` section gets


class RouteSettings(Section):
    """Which named model judges which kind of event (None = the default rule, see ``RoutingSettings``)."""

    text: str | None = Field(None, description="model judging text-only events")
    image: str | None = Field(None, description="model judging events with one image")
    multi_image: str | None = Field(
        None, description="model judging events with several images (a llama-guard-4 model)"
    )


class RoutingSettings(RouteSettings):
    """Which model judges which event; unset = text guard for text, Vision (else Llama Guard 4) for images."""

    policies: dict[str, RouteSettings] = Field({}, description="per-policy routing, by policy id")


class PoolSettings(Section):
    """One pool of workers (split deployment): its own consumer group, judging only its models' events."""

    models: list[str] = Field(
        description="the named models this pool holds; it judges the events routed to them"
    )
    dead_letters: bool = Field(
        False, description="this pool publishes the dead letters of events no model was chosen for (one pool)"
    )
    num_workers: int | None = Field(
        None, ge=1, description="Ray actors of this pool; default ray.num_workers"
    )
    num_gpus_per_worker: float | None = Field(None, ge=0, description="default ray.num_gpus_per_worker")
    ray_resource: str | None = Field(
        None,
        description="custom Ray resource each actor of the pool requires (one unit): pins it to its nodes",
    )

    @field_validator("models")
    @classmethod
    def _some_models(cls, models: list[str]) -> list[str]:
        if not models:
            raise ValueError("a pool needs at least one model")
        return models


class ModelsMixin(BaseModel):
    """Checks and look-ups of the ``models`` / ``routing`` / ``pools`` / ``pool`` settings (see ``worker.moderation.routing``)."""

    def guard_models(self) -> dict[str, ModelSettings]:
        """Every configured model by name: ``models``, or the single ``model`` section as ``default``."""
        return dict(self.models) if self.models else {DEFAULT_MODEL_NAME: self.model}

    def _check_models(self) -> None:
        # A dump of these settings carries the untouched default ``model`` section: only a changed one conflicts.
        if self.models and "model" in self.model_fields_set and self.model != ModelSettings():
            raise ValueError("set either `model` (one model) or `models` (named models), not both")
        names = set(self.guard_models())
        routes = [("routing", self.routing)] + [
            (f"routing.policies.{p}", r) for p, r in self.routing.policies.items()
        ]
        for where, route in routes:
            for kind in ("text", "image", "multi_image"):
                name = getattr(route, kind)
                if name is not None and name not in names:
                    raise ValueError(f"{where}.{kind} names model {name!r}, not among models {sorted(names)}")
        unknown_policies = sorted(set(self.routing.policies) - set(self.policies))  # type: ignore[attr-defined]
        if unknown_policies:
            raise ValueError(f"routing.policies names unknown policies {unknown_policies}")
        seen: dict[str, str] = {}
        for pool_name, pool in self.pools.items():
            for model in pool.models:
                if model not in names:
                    raise ValueError(
                        f"pools.{pool_name}.models names model {model!r}, not among {sorted(names)}"
                    )
                if model in seen:
                    raise ValueError(
                        f"model {model!r} is in pools {seen[model]!r} and {pool_name!r}: one pool each"
                    )
                seen[model] = pool_name
        if self.pools:
            owners = [n for n, p in self.pools.items() if p.dead_letters]
            if len(owners) > 1:
                raise ValueError(f"pools {owners} all set dead_letters: exactly one pool may publish them")
        if self.pool is not None and self.pool not in self.pools:
            raise ValueError(f"pool {self.pool!r} is not among pools {sorted(self.pools)}")


class RedisSettings(Section):
    """Verdict cache."""

    enabled: bool = True
    url: str = "redis://127.0.0.1:6379/0"
    password: SecretStr | None = None
    ttl_seconds: int = Field(86_400, ge=1)
    key_prefix: str = "mw:v1:"
    socket_timeout_s: float = Field(0.5, gt=0)
    reconnect_interval_s: float = Field(2.0, gt=0)
    near_cache_s: float = Field(
        1.0,
        ge=0,
        description="how long a process keeps a verdict it read from Redis and answers repeats of its key without "
        "a round trip (a near cache); 0: every lookup reads Redis. An entry deleted in Redis may answer this long",
    )
    published_markers: bool = Field(
        True,
        description="after the broker acknowledges an event's outputs, mark its source offset in Redis; a "
        "record replayed after a crash whose answer is marked is not published again",
    )
    published_marker_ttl_s: int = Field(
        900,
        ge=1,
        description="how long a published marker lives at least (its block's TTL, renewed by each write into the "
        "block); must exceed the time an answered record can wait uncommitted behind a slow one, plus a restart",
    )


class FailureSettings(Section):
    """When a failing dependency stops the stream (pause, not ready, retry with backoff) instead of
    dead-lettering or re-publishing without end."""

    max_failed_batches: int = Field(
        3,
        ge=1,
        description="consecutive batches on which every item failed in the engine before the worker declares "
        "an engine outage even though a probe request still succeeds (a probe failure declares it at once)",
    )
    max_publish_attempts: int = Field(
        5,
        ge=1,
        description="failed deliveries of one event before the worker declares a delivery outage (it keeps "
        "retrying with backoff; nothing is dropped)",
    )
    retry_initial_s: float = Field(
        1.0, gt=0, description="first retry delay in an outage; doubles per attempt"
    )
    retry_max_s: float = Field(60.0, gt=0, description="longest delay between retries in an outage")


class LimitsSettings(Section):
    """Input limits; anything beyond them becomes a dead letter with a reason."""

    max_record_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_text_chars: int = Field(32_000, ge=1, description="per text part")
    max_total_text_chars: int = Field(128_000, ge=1)
    max_messages: int = Field(200, ge=1)
    max_json_depth: int = Field(32, ge=4)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1024)
    max_image_side: int = Field(20_000, ge=16)
    multiple_images: Literal["reject", "keep_last"] = Field(
        "reject",
        description="a second image for a one-image model (Llama Guard 3 Vision): reject the event, or keep the "
        "most recent image",
    )
    max_images_llama_guard_4: int = Field(
        5, ge=1, le=16, description="images one event may carry when Llama Guard 4 judges it (all are read)"
    )
    merge_consecutive_roles: bool = True
    dead_letter_original_max_bytes: int = Field(64 * 1024, ge=0)


class ImageFetchSettings(Section):
    """Fetching ``http(s)`` image URLs, with an SSRF guard."""

    enabled: bool = True
    allowed_schemes: Annotated[list[Literal["http", "https"]], NoDecode, BeforeValidator(_comma_list)] = [
        "https",
        "http",
    ]
    connect_timeout_s: float = Field(3.0, gt=0)
    read_timeout_s: float = Field(5.0, gt=0)
    total_timeout_s: float = Field(
        10.0,
        gt=0,
        description="deadline for one image fetch over all redirects; caps every connect/read timeout",
    )
    ca_bundle: str | None = Field(
        None, description="PEM file of CAs trusted for https image URLs; default: the system trust store"
    )
    max_redirects: int = Field(3, ge=0, le=10)
    allowed_content_types: StrList = ["image/jpeg", "image/png", "image/gif", "image/webp", "image/bmp"]
    allow_networks: StrList = Field(
        [], description="CIDRs exempt from the SSRF guard (e.g. an internal CDN); empty = none"
    )
    user_agent: str = "moderation-worker/0.1"

    @field_validator("allow_networks")
    @classmethod
    def _valid_cidrs(cls, cidrs: list[str]) -> list[str]:
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a CIDR network ({exc})") from None
        return cidrs


class LoggingSettings(Section):
    """Structured logs."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"
    include_content: bool = Field(False, description="log message text/images (debug only; privacy)")


class OpsSettings(Section):
    """Metrics and health endpoints of ``moderation-worker run``."""

    host: str = "127.0.0.1"
    port: int = Field(9400, ge=0, le=65535, description="0 = no HTTP endpoint")


class ShutdownSettings(Section):
    """Graceful shutdown on SIGTERM/SIGINT."""

    drain_timeout_s: float = Field(30.0, gt=0)


class RaySettings(Section):
    """Running stream workers as Ray actors (``run --ray``)."""

    enabled: bool = False
    address: str | None = Field(
        None, description="Ray cluster address; default RAY_ADDRESS or a local instance"
    )
    num_workers: int | None = Field(None, ge=1, description="default: the cluster's GPU count (1 when none)")
    num_gpus_per_worker: float = Field(1.0, ge=0)
    num_cpus_per_worker: float = Field(0.0, ge=0)
    max_restarts: int = Field(-1, ge=-1)
    local_num_gpus: int | None = Field(None, ge=0, description="fake GPUs for a local instance (tests)")
    autoscale: bool = Field(
        False, description="scale actors between min_workers and max_workers on Kafka lag"
    )
    min_workers: int = Field(1, ge=1, description="autoscale: fewest actors")
    max_workers: int = Field(
        1, ge=1, description="autoscale: most actors (never more than the topic's partitions)"
    )
    lag_per_worker: int = Field(
        1000, ge=1, description="autoscale: records of group lag one actor is sized for"
    )
    autoscale_interval_s: float = Field(15.0, gt=0, description="autoscale: seconds between two plans")
    scale_in_after_s: float = Field(
        60.0, ge=0, description="autoscale: lag must call for fewer actors this long before one is drained"
    )

    @model_validator(mode="after")
    def _worker_bounds(self) -> RaySettings:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) exceeds max_workers ({self.max_workers})")
        return self


class ServeSettings(Section):
    """The Ray Serve HTTP endpoint (``moderation-worker serve``)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_replicas: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_events_per_request: int = Field(64, ge=1)
    max_request_image_pixels: int = Field(
        80_000_000,
        ge=1024,
        description="sum of the declared sizes (width x height) of one request's images; above it the request "
        "is refused with 413 before any image is decoded",
    )
    max_decoding_pixels: int = Field(
        80_000_000,
        ge=1024,
        description="pixels a replica decodes at the same time (all requests together); further images wait "
        "their turn, so memory stays bounded and text-only requests are not queued behind them",
    )
    decode_threads: int = Field(1, ge=1, le=16, description="threads a replica decodes images on")
    drain_timeout_s: float = Field(
        20.0, gt=0, description="on SIGTERM: how long in-flight requests may take before the replica stops"
    )
    openai_categories: dict[str, list[str]] = Field(
        {},
        description="POST /v1/moderations: extra or replaced mappings from a category code (S-code or custom "
        "blocklist category) to OpenAI category names, e.g. {spam: [illicit]}",
    )

    @field_validator("openai_categories")
    @classmethod
    def _openai_names(cls, mapping: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted({n for names in mapping.values() for n in names} - set(OPENAI_CATEGORY_NAMES))
        if unknown:
            raise ValueError(f"unknown OpenAI category names {unknown}; known: {list(OPENAI_CATEGORY_NAMES)}")
        return mapping


class TenantSettings(Section):
    """One tenant: the policy its events get, and the other policies an event (or API key) may name."""

    policy: str = Field(..., description="policy applied to the tenant's events that name none")
    allowed_policies: list[str] = Field([], description="other policies the tenant's events may name")

    @property
    def policies(self) -> list[str]:
        """Every policy the tenant may use, its own first."""
        return list(dict.fromkeys([self.policy, *self.allowed_policies]))


class ApiKeySettings(Section):
    """One bearer API key of the HTTP endpoints: where its secret comes from, its tenant and its budget."""

    tenant: str = Field(..., description="the tenant the key acts for (only that tenant's policies)")
    key: SecretStr | None = Field(None, description="the key itself (prefer key_env / key_file: a Secret)")
    key_env: str | None = Field(None, description="environment variable holding the key")
    key_file: str | None = Field(None, description="file holding the key (surrounding whitespace stripped)")
    requests_per_second: float = Field(10.0, gt=0, description="token-bucket refill rate (requests/s)")
    burst: int = Field(20, ge=1, description="token-bucket size: requests allowed at once")

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeySettings:
        given = [n for n in ("key", "key_env", "key_file") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"an API key needs exactly one of key, key_env, key_file (got {given or 'none'})"
            )
        return self


class AuthSettings(Section):
    """Bearer API keys on the HTTP endpoints (off for local development; on in the Helm chart)."""

    enabled: bool = False
    keys: dict[str, ApiKeySettings] = Field(
        {},
        description="API keys by name (the name is logged, the key never); with enabled, at least one, each "
        "naming a configured tenant (checked when the endpoint starts)",
    )


class Settings(ModelsMixin, BaseSettings):
    """Everything the worker reads. See the README's configuration reference."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    batching: BatchingSettings = BatchingSettings()
    default_policy: str = "default"
    policies: dict[str, PolicySettings] = {"default": PolicySettings()}
    model: ModelSettings = ModelSettings()
    models: dict[str, ModelSettings] = Field(
        {}, description="named guard models; empty = the single `model` section, named `default`"
    )
    routing: RoutingSettings = RoutingSettings()
    pools: dict[str, PoolSettings] = Field(
        {}, description="split deployment: pools of workers, each judging the events routed to its models"
    )
    pool: str | None = Field(None, description="the pool this worker serves (None = every configured model)")
    redis: RedisSettings = RedisSettings()
    limits: LimitsSettings = LimitsSettings()
    failures: FailureSettings = FailureSettings()
    image_fetch: ImageFetchSettings = ImageFetchSettings()
    logging: LoggingSettings = LoggingSettings()
    ops: OpsSettings = OpsSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    ray: RaySettings = RaySettings()
    serve: ServeSettings = ServeSettings()
    tenants: dict[str, TenantSettings] = Field(
        {}, description="tenant id -> its policies; empty = events name any configured policy"
    )
    auth: AuthSettings = AuthSettings()

    @model_validator(mode="after")
    def _default_policy_exists(self) -> Settings:
        if self.default_policy not in self.policies:
            raise ValueError(
                f"default_policy {self.default_policy!r} is not among policies {sorted(self.policies)}"
            )
        return self

    @model_validator(mode="after")
    def _tenants_and_keys_consistent(self) -> Settings:
        for tenant_id, tenant in self.tenants.items():
            unknown = [p for p in tenant.policies if p not in self.policies]
            if unknown:
                raise ValueError(f"tenants.{tenant_id} names unknown policies {unknown}")
        for name, key in self.auth.keys.items():
            if self.tenants and key.tenant not in self.tenants:
                raise ValueError(
                    f"auth.keys.{name}.tenant {key.tenant!r} is not among tenants {sorted(self.tenants)}"
                )
        return self

    @model_validator(mode="after")
    def _models_routing_pools_agree(self) -> Settings:
        self._check_models()
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # YAML values arrive as init kwargs (see load_settings); env must win over them, so env goes first.
        return (env_settings, init_settings)

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data: secrets and URL passwords replaced by ``**********``."""
        return _mask_strings(self.model_dump(mode="json"))  # SecretStr already dumps as "**********"


def _mask_strings(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url_credentials(value)
    if isinstance(value, dict):
        return {k: _mask_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_strings(v) for v in value]
    return value


class ConfigError(Exception):
    """A configuration file or value is wrong; the message names the key."""


def _format_validation_error(err: ValidationError, origin: str) -> str:
    """One line: every failing key with its dotted name (and the env variable it came from, if any)."""
    problems = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) or "<root>"
        env = _env_name_for(loc)
        where = f" (from {env})" if env else ""
        message = mask_url_credentials(str(e["msg"]))
        problems.append(f"{key}: {message}{where}")
    return f"invalid configuration ({origin}): " + "; ".join(problems)


def _env_name_for(loc: list[str]) -> str | None:
    """The ``MW_...`` variable that set the key at ``loc`` (or one of its parents), if one is set."""
    for end in range(len(loc), 0, -1):
        name = ENV_PREFIX + "__".join(loc[:end]).upper()
        if name in os.environ:
            return name
    return None


def _unwrap(annotation: Any) -> Any:
    """``X | None`` → ``X``; ``Annotated[X, ...]`` → ``X``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation


def _check_environment(environ: typing.Mapping[str, str]) -> None:
    """Refuse ``MW_`` variables that name no key, or hold a mapping that is not JSON, with one line each.

    pydantic-settings ignores variables whose *section* is unknown (``MW_BATCHNG__MAX_SIZE``) and reports a
    mapping that is not JSON as a traceback naming only the section; both become a ``ConfigError`` naming
    the full key and the variable.
    """
    top_level = {name.upper() for name in Settings.model_fields}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == "MW_CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :]
        if "__" not in rest and rest not in top_level:
            continue  # not a setting (test and tool knobs share the prefix)
        parts = rest.lower().split("__")
        annotation: Any = Settings
        dotted: list[str] = []
        for part in parts:
            annotation = _unwrap(annotation)
            dotted.append(part)
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                field = annotation.model_fields.get(part)
                if field is None:
                    known = (
                        f"; sections: {', '.join(annotation.model_fields)}" if annotation is Settings else ""
                    )
                    raise ConfigError(f"unknown configuration key: {'.'.join(dotted)} (from {name}){known}")
                annotation = field.annotation
                if NoDecode in field.metadata:
                    annotation = str  # validated (and split) by the field itself
            elif typing.get_origin(annotation) is dict:
                annotation = typing.get_args(annotation)[1]
            else:
                raise ConfigError(f"unknown configuration key: {'.'.join(dotted)} (from {name})")
        target = _unwrap(annotation)
        complex_target = typing.get_origin(target) in (dict, list) or (
            isinstance(target, type) and issubclass(target, BaseModel)
        )
        if complex_target and value.strip():
            try:
                orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                kind = "list" if typing.get_origin(target) is list else "object"
                raise ConfigError(
                    f"invalid configuration (environment): {'.'.join(dotted)}: {name} is not a JSON {kind} "
                    f"({exc.msg} at character {exc.pos})"
                ) from None


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load settings from YAML ``path`` (or ``$MW_CONFIG``), then env vars, then ``overrides``.

    Raises ``ConfigError`` naming the offending key on unknown keys or bad values.
    """
    path = path or os.environ.get("MW_CONFIG") or None
    data: dict[str, Any] = {}
    origin = "defaults + environment"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
        origin = f"{p} + environment"
    _check_environment(os.environ)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from exc
    except (
        SettingsError
    ) as exc:  # a value pydantic-settings could not parse (_check_environment catches most)
        raise ConfigError(f"invalid configuration (environment): {exc}") from exc
    for dotted, value in overrides.items():
        _set_dotted(settings, dotted, value)
    return settings


def _set_dotted(settings: Settings, dotted: str, value: Any) -> None:
    """Apply an override like ``kafka__group_id`` or ``kafka.group_id`` (validated on assignment)."""
    parts = dotted.replace("__", ".").split(".")
    target: Any = settings
    key = ".".join(parts)
    for part in parts[:-1]:
        if not isinstance(target, BaseModel) or part not in type(target).model_fields:
            raise ConfigError(f"unknown configuration key: {key}")
        target = getattr(target, part)
    if not hasattr(target, parts[-1]):
        raise ConfigError(f"unknown configuration key: {key}")
    try:
        setattr(target, parts[-1], value)
    except ValidationError as exc:
        reasons = "; ".join(e["msg"] for e in exc.errors())
        raise ConfigError(f"invalid configuration (override): {key}: {reasons}") from exc
