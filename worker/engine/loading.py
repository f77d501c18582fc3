"""Loading a Llama Guard model's processor and weights for inference, per ``model.family``.

Llama Guard 3 Vision is an Mllama checkpoint (``MllamaForConditionalGeneration`` + ``MllamaProcessor``), Llama
Guard 3 1B and 8B are Llama ones (``AutoModelForCausalLM`` + the tokenizer as processor), Llama Guard 4 a
Llama 4 one (``Llama4ForConditionalGeneration`` + ``AutoProcessor``). The checkpoint's ``model_type`` must
match the family's: a Vision config under ``family: llama-guard-3-1b`` is a configuration error, not a
silent mis-prompting.

``model.path`` is a local directory or a hub id. The dtype follows the device unless configured (bf16 on
CUDA, fp32 on CPU); the model is put in eval mode and used only under ``torch.inference_mode``. An Mllama
model gets Meta's reference cross-attention masking unless ``model.reference_cross_attention`` is off (see
``worker.engine.families.mllama_cross_attention``). Every
failure to find or recognise a checkpoint becomes a ``ModelLoadError`` whose message names ``model.path``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.contracts.verdicts import ModelInfo

if TYPE_CHECKING:
    import torch

    from worker.config import ModelSettings

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded; the message says which ``model.path`` and why."""


@dataclass(slots=True)
class LoadedModel:
    """A ready processor + model pair and what we know about it."""

    processor: Any  # MllamaProcessor / Llama4Processor, or the tokenizer itself for a text-only family
    model: (
        Any  # MllamaForConditionalGeneration / LlamaForCausalLM / Llama4ForConditionalGeneration, eval mode
    )
    device: torch.device
    dtype: torch.dtype
    info: ModelInfo
    load_seconds: float
    parameters: int
    # Mllama only: the cross-attention layers use Meta's reference output masking (``model.reference_cross_attention``).
    reference_cross_attention: bool = False


def resolve_device(device: str) -> torch.device:
    """``auto`` = the first CUDA device when there is one (Ray sets CUDA_VISIBLE_DEVICES), else CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"model.device {device!r} is not a torch device: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device {device!r} asks for CUDA but no CUDA device is available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` = bfloat16 on CUDA, float32 elsewhere (bf16 matmuls on CPU are slow and less exact)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, _DTYPES[dtype])


def _looks_like_path(path: str) -> bool:
    # A hub id is "name" or "org/name"; anything else is meant as a filesystem path.
    return path.startswith(("/", ".", "~")) or "\\" in path or path.count("/") > 1 or Path(path).exists()


def _cached_snapshot(repo_id: str, revision: str | None) -> str:
    """The local snapshot directory of a hub id already in the Hugging Face cache (filesystem only)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision or "main")
    except ValueError as exc:  # not a valid repo id
        raise ModelLoadError(f"model.path {repo_id!r} is neither a directory nor a hub id: {exc}") from exc
    if not isinstance(found, str):
        raise ModelLoadError(
            f"model.path {repo_id!r}: not a local directory, and the hub id is not in the local Hugging Face "
            "cache (model.local_files_only is true: download it first or set model.path to a directory)"
        )
    return str(Path(found).parent)


def local_revision(directory: Path) -> str:
    """A fingerprint of a local checkpoint (config bytes + weight file sizes and mtimes) for cache keys.

    A rebuilt or replaced checkpoint at the same path gets a new revision, so stale cached verdicts are not
    served; cheap even for multi-GB weights (no file content is read besides config.json).
    """
    digest = hashlib.sha256()
    config = directory / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "local-" + digest.hexdigest()[:12]


def quiet_transformers() -> None:
    """No progress bars ("Loading weights") and no library-formatted lines on stderr: logs are JSON lines.

    Uses the libraries' own switches: transformers' records go to the root logger (the worker's handler)
    instead of transformers' own stderr handler.
    """
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    huggingface_hub.utils.disable_progress_bars()


def _classes(model_type: str) -> tuple[Any, Any]:
    """(processor class, model class) for a checkpoint architecture."""
    import transformers

    if model_type == "mllama":
        return transformers.AutoProcessor, transformers.MllamaForConditionalGeneration
    if model_type == "llama4":
        from worker.engine.families.llama4_model import GuardLlama4ForConditionalGeneration

        return transformers.AutoProcessor, GuardLlama4ForConditionalGeneration
    return transformers.AutoTokenizer, transformers.AutoModelForCausalLM


def _load_processor(processor_class: Any, model_type: str, source: str, common: dict[str, Any]) -> Any:
    """The checkpoint's own processor; for Llama 4 without torchvision, the project's PIL one on the same files.

    transformers implements Llama 4's image processor only with torchvision. Where that is missing (CPU
    hosts), ``Llama4PilProcessor`` reads the same ``preprocessor_config.json`` and ``processor_config.json``.
    """
    try:
        return processor_class.from_pretrained(source, **common)
    except ImportError:
        if model_type != "llama4" or not Path(source).is_dir():
            raise
        from worker.engine.families.llama4_images import Llama4PilProcessor

        log.info(
            "torchvision is not installed: using the PIL Llama 4 image processor", extra={"stage": "load"}
        )
        return Llama4PilProcessor.from_pretrained(source, **common)


def _source(settings: ModelSettings) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` loads ``settings.path`` from, and the options it needs (revision, offline, token)."""
    path = settings.path
    local_dir = Path(path).expanduser()
    is_local = local_dir.is_dir()
    if not is_local and _looks_like_path(path):
        what = "is not a directory" if local_dir.exists() else "no such directory"
        raise ModelLoadError(f"model.path {path!r}: {what}")
    source = str(local_dir) if is_local else path
    if not is_local and settings.local_files_only:
        # Resolve the hub id in the local cache ourselves: huggingface_hub contacts the Hub while building
        # request headers even when local_files_only=True, and offline must mean no packet at all.
        source = _cached_snapshot(path, settings.revision)
    common: dict[str, Any] = {"revision": settings.revision, "local_files_only": settings.local_files_only}
    if settings.hf_token is not None:
        common["token"] = settings.hf_token.get_secret_value()
    return source, common


def load_processor(settings: ModelSettings) -> Any:
    """The checkpoint's processor (tokenizer for a text-only family) alone, without the weights.

    What a process that only prepares batches needs (``worker.moderation.image_preparation``).
    """
    from worker.engine.families import get_family

    quiet_transformers()
    family = get_family(settings.family)
    source, common = _source(settings)
    processor_class, _ = _classes(family.model_type)
    return _load_processor(processor_class, family.model_type, source, common)


def load_model(settings: ModelSettings) -> LoadedModel:
    """Load processor and model per ``settings`` (``worker.config.ModelSettings``)."""
    from transformers import AutoConfig

    quiet_transformers()
    from worker.engine.families import get_family

    family = get_family(settings.family)
    started = time.perf_counter()
    path = settings.path
    local_dir = Path(path).expanduser()
    is_local = local_dir.is_dir()
    source, common = _source(settings)
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except (OSError, ValueError) as exc:
        where = "local directory" if is_local else f"hub id (local_files_only={settings.local_files_only})"
        raise ModelLoadError(f"model.path {path!r} ({where}) has no loadable model config: {exc}") from exc
    model_type = getattr(config, "model_type", None)
    if model_type != family.model_type:
        raise ModelLoadError(
            f"model.path {path!r} is a {model_type or 'unknown'!r} checkpoint, not a {family.model_type!r} one as "
            f"model.family {family.name!r} needs"
        )
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    try:
        processor_class, model_class = _classes(family.model_type)
        processor = _load_processor(processor_class, family.model_type, source, common)
        # On CUDA the weights go straight to the device (no 21 GB detour through host memory for the 11B model).
        placement = {"device_map": str(device)} if device.type == "cuda" else {}
        model = model_class.from_pretrained(source, dtype=dtype, **placement, **common)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(
            f"model.path {path!r}: cannot load the {family.name} processor or weights: {exc}"
        ) from exc
    if family.supports_images and (
        not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer")
    ):
        raise ModelLoadError(f"model.path {path!r}: the processor has no image processor and tokenizer")
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    reference_cross_attention = False
    if family.model_type == "mllama" and settings.reference_cross_attention:
        from worker.engine.families.mllama_cross_attention import (
            UntestedTransformersError,
            apply_reference_cross_attention,
        )

        try:
            reference_cross_attention = apply_reference_cross_attention(model) > 0
        except UntestedTransformersError as exc:
            raise ModelLoadError(str(exc)) from exc
    seconds = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters())
    revision = settings.revision or getattr(config, "_commit_hash", None) or local_revision(Path(source))
    model_id = settings.model_id or (local_dir.name if is_local else path)
    log.info(
        "model loaded",
        extra={
            "stage": "load",
            "model_path": path,
            "model_id": model_id,
            "revision": revision,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "load_seconds": round(seconds, 3),
            "parameters": parameters,
            "reference_cross_attention": reference_cross_attention,
        },
    )
    return LoadedModel(
        processor,
        model,
        device,
        dtype,
        ModelInfo(model_id, revision),
        seconds,
        parameters,
        reference_cross_attention,
    )
