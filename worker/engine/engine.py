"""``GuardEngine``: conversations in, ``GuardResult`` out — shared by the Kafka pipeline and the HTTP endpoint.

One engine contract for every Llama Guard family (``model.family``): the prompt comes from the family's rules
(``worker.engine.families``), the scoring (single-pass P(unsafe), decode only if unsafe, exact sharing of the
prompt's start) is the same for all. Text-only families refuse image requests item by item.

Two steps, so CPU work overlaps the model: ``prepare`` (render prompts, tokenize, tile images; CPU only,
thread-safe) and ``run`` (forward pass + decoding of unsafe rows; serialized by a lock). ``classify`` chunks
and orders for callers that do not care.

Modalities. Llama Guard 3 Vision loads with Meta's reference cross-attention masking
(``model.reference_cross_attention``, see ``worker.engine.families.mllama_cross_attention``): a token that
sees no image gets no cross-attention contribution, so a text-only row computes the same in a batch with
image rows as alone, and the tokens before ``<|image|>`` do not depend on the image. Then a single-pass batch
may mix image and text-only rows (``mixes_modalities``; the vision encoder runs on the image rows only and the
text rows read zero vision states) — exact, but not cheaper per item, so ``batches`` and ``classify`` still
split by modality. Without the patch (transformers masks only the MLP branch), and in the ``generate``
reference mode, ``prepare`` refuses a mixed batch.

Shared prompt start (``model.share_prompt_prefix``, single-pass): the part of a prompt that is the same for
every row of a policy and task is computed once and its keys/values reused (exact). Text-only rows share the
instructions and categories; with the reference masking, image rows share the tokens before ``<|image|>`` —
for the Llama Guard 3 Vision template only the header, since its ``<|image|>`` comes before the task text,
and every later token attends to the image.

Errors are values: an item that cannot be prepared, a batch whose forward pass fails, or an answer that does
not parse becomes an ``EngineError`` (with its ``ErrorKind``) for the items concerned; the process keeps going.
``classify`` runs each batch through ``worker.engine.isolation.run_isolated``: a batch that fails as a whole
(raised, or ran the device out of memory) is bisected until the failing items stand alone.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from worker.contracts.events import Turn
from worker.engine import scoring
from worker.engine.category_scores import category_scores, code_first_tokens
from worker.engine.families import get_family
from worker.engine.parsing import parse_answer, parse_codes_continuation
from worker.engine.policy import Policy, load_policies, resolve_policy
from worker.engine.prompt import Segment, judged_role, render_segments, shared_text_prefix
from worker.engine.tokenize import PromptTokenizer, left_pad
from worker.engine.types import EngineError, GuardRequest, GuardResult

if TYPE_CHECKING:
    from worker.config import ModelSettings, Settings
    from worker.contracts.verdicts import ModelInfo
    from worker.engine.loading import LoadedModel

log = logging.getLogger(__name__)

# Below this mass on {safe, unsafe} at the answer position the checkpoint is not answering in format
# (wrong answer prefix, wrong template, or an untrained model): worth a warning, not an error.
LOW_ANSWER_MASS = 0.5
_PROBE_TURNS = (Turn("user", ("Hello, how are you today?",)),)


def _max_images_setting(settings: Settings, family: str) -> int:
    """The configured image limit of a family (``limits.max_images_llama_guard_4``), else the family's own."""
    configured = getattr(settings.limits, "max_images_" + family.replace("-", "_"), None)
    return int(configured) if configured is not None else get_family(family).max_images


_PREFIX_KV_ENTRIES = (
    32  # shared prompt starts kept on the device (policy x task); ~12 MB each for the 11B model
)


@dataclass(slots=True)
class PreparedBatch:
    """A batch ready for the model: CPU tensors for ``rows`` and errors for the items that failed to prepare."""

    requests: list[GuardRequest]
    has_image: bool  # some row carries an image (all of them unless the engine mixes modalities)
    mode: str
    rows: list[int] = field(
        default_factory=list
    )  # indices into ``requests`` present in the tensors, in order
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[int, EngineError] = field(default_factory=dict)
    # Shared prompt start: per row the key of its prefix; the ids of each key. Empty = not shared.
    prefix_keys: list[tuple[str, str]] = field(default_factory=list)
    prefix_ids: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)


@dataclass(frozen=True, slots=True)
class PreparationSpec:
    """What ``prepare`` reads besides the processor: enough to prepare exactly as the engine would elsewhere.

    Picklable, so another process can build a preparer from it (``GuardEngine.preparer``) with the processor
    loaded from ``model`` — never the weights.
    """

    model: ModelSettings
    mode: str
    share_prefix: bool
    reference_cross_attention: bool
    max_images: int
    answer_prefix_ids: tuple[int, ...]
    answer_tail: tuple[int, ...]
    policies: dict[str, Policy]
    default_policy_id: str


class GuardEngine:
    """A Llama Guard model of any family as a batch classifier (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, policies: dict[str, Policy], settings: Settings) -> None:
        self._loaded = loaded
        self._model_settings = settings.model
        self.model = loaded.model
        self.processor = loaded.processor
        self._family = get_family(settings.model.family)
        self._max_images = min(self._family.max_images, _max_images_setting(settings, self._family.name))
        self.policies = policies
        self.default_policy_id = settings.default_policy
        self.mode = settings.model.mode
        self.max_new_tokens = settings.model.max_new_tokens
        self.max_batch_size = settings.batching.max_size
        self.tokens = PromptTokenizer(self.tokenizer, self._family.name)
        self.answer = self.tokens.answer_tokens(self.model.generation_config.eos_token_id)
        self._run_lock = threading.Lock()
        self.share_prefix = settings.model.share_prompt_prefix
        self.reference_cross_attention = loaded.reference_cross_attention
        self._prefix_kv: OrderedDict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor] | None]] = (
            OrderedDict()
        )
        self._warned_low_mass = False
        # The format tokens every unsafe answer starts with ("unsafe", newline, "S"): see worker.engine.scoring.
        tail = self.tokens.plain_ids("unsafe\nS")
        self.answer_tail: list[int] = (
            tail if tail[: len(self.answer.unsafe_ids)] == list(self.answer.unsafe_ids) else []
        )
        # First token of each code after the tail: per-category scores come from the same pass.
        self.code_tokens: dict[str, int] = code_first_tokens(self.tokens.plain_ids, self.answer_tail)
        if settings.model.answer_prefix is not None:
            self.answer_prefix_ids: list[int] = self.tokens.plain_ids(settings.model.answer_prefix)
        else:
            self.answer_prefix_ids = self.detect_answer_prefix()
        log.info(
            "guard engine ready",
            extra={
                "stage": "load",
                "mode": self.mode,
                "answer_prefix": self.tokenizer.decode(self.answer_prefix_ids),
            },
        )

    # -- construction and facts ---------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: Settings) -> GuardEngine:
        """Load processor and model per ``settings.model`` and the policies per ``settings.policies``."""
        from worker.engine.loading import load_model
        from worker.engine.threads import apply_thread_budget

        apply_thread_budget(settings.batching)
        policies = load_policies(settings, settings.model.family)
        return cls(load_model(settings.model), policies, settings)

    def with_mode(self, mode: str, *, share_prefix: bool | None = None) -> GuardEngine:
        """An engine on the same loaded model in another mode (``generate`` = the reference); no reload.

        Both share the model lock, so their ``run`` calls never overlap on the device.
        """
        if mode not in ("single_pass", "generate"):
            raise ValueError(f"unknown engine mode {mode!r}")
        sibling = copy.copy(self)
        sibling.mode = mode
        if share_prefix is not None:
            sibling.share_prefix = share_prefix
        return sibling

    def preparation_spec(self) -> PreparationSpec:
        """This engine's ``prepare`` as a picklable recipe (see ``preparer``)."""
        return PreparationSpec(
            model=self._model_settings,
            mode=self.mode,
            share_prefix=self.share_prefix,
            reference_cross_attention=self.reference_cross_attention,
            max_images=self._max_images,
            answer_prefix_ids=tuple(self.answer_prefix_ids),
            answer_tail=tuple(self.answer_tail),
            policies=self.policies,
            default_policy_id=self.default_policy_id,
        )

    @classmethod
    def preparer(cls, spec: PreparationSpec, processor: Any) -> GuardEngine:
        """An engine that only prepares: ``prepare`` as the engine of ``spec`` computes it, on ``processor``.

        It holds no model (``run`` cannot work): what a preparation process builds, so that the batches it
        prepares are exactly the engine's (every field ``prepare`` reads comes from ``spec``).
        """
        engine = cls.__new__(cls)
        engine.model = None
        engine.processor = processor
        engine._family = get_family(spec.model.family)
        engine._max_images = spec.max_images
        engine.policies = spec.policies
        engine.default_policy_id = spec.default_policy_id
        engine.mode = spec.mode
        engine.share_prefix = spec.share_prefix
        engine.reference_cross_attention = spec.reference_cross_attention
        engine.tokens = PromptTokenizer(engine.tokenizer, engine._family.name)
        engine.answer_prefix_ids = list(spec.answer_prefix_ids)
        engine.answer_tail = list(spec.answer_tail)
        return engine

    @property
    def loaded(self) -> LoadedModel:
        """The processor, model and load facts this engine runs on."""
        return self._loaded

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (a text-only family's processor *is* its tokenizer)."""
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def family(self) -> str:
        """The Llama Guard family this engine judges as (``model.family``)."""
        return self._family.name

    @property
    def supports_images(self) -> bool:
        """Whether this engine's model reads images (Llama Guard 3 Vision and 4 do; 1B and 8B do not)."""
        return self._max_images > 0

    @property
    def mixes_modalities(self) -> bool:
        """Whether one batch may hold image and text-only rows (``prepare``/``run`` accept it; fewer, fuller batches).

        True for a single-pass engine whose results do not depend on the batch's modality mix: Llama Guard 3
        Vision with the reference cross-attention masking (``model.reference_cross_attention``), and the text
        guards (an image row there is refused item by item anyway). False for Vision without the patch
        (transformers' Mllama changes an image-less row's logits when images share its batch), for Llama Guard
        4 (not verified mixed), and in ``generate`` mode. A batcher reads it to decide whether it *may* put
        both modalities in one pass. Whether that pays is a cost question: in a mixed pass the text rows go
        through the cross-attention layers (exactly no contribution, full compute) and are padded to the image
        rows' length (image rows share only the header, text rows the whole policy text); on the tiny CPU
        guard one mixed pass per window measured 0.54–0.71x the items/s of a text pass plus an image pass with
        the shared prompt start on, 0.71–0.97x with it off. Mix to fill a pass that would otherwise run nearly
        empty, not by default.
        """
        if self.mode != "single_pass":
            return False
        if self._family.model_type == "mllama":
            return self.reference_cross_attention
        return not self._family.supports_images

    @property
    def shares_image_prefix(self) -> bool:
        """Whether image rows share their prompt start (the tokens before the first ``<|image|>``) exactly."""
        return self._family.model_type == "mllama" and self.reference_cross_attention

    @property
    def max_images(self) -> int:
        """Images one request may carry here: 0 (text guard), 1 (Vision), the configured limit (Llama Guard 4)."""
        return self._max_images

    @property
    def model_info(self) -> ModelInfo:
        return self._loaded.info

    @property
    def device(self) -> str:
        return str(self._loaded.device)

    @property
    def load_seconds(self) -> float:
        return self._loaded.load_seconds

    def policy_for(self, policy_id: str | None) -> Policy:
        """The policy for an event's ``policy`` field (None = default); RejectedError(UNKNOWN_POLICY) if unknown."""
        return resolve_policy(self.policies, policy_id, self.default_policy_id)

    def detect_answer_prefix(self) -> list[int]:
        """The whitespace tokens the checkpoint greedily emits after the assistant header, before the answer.

        Llama Guard 3 emits ``\\n\\n``; a checkpoint that emits nothing gets an empty prefix. Measured on a
        benign probe conversation (the format does not depend on the content).
        """
        policy = self.policy_for(None)
        batch = self._tensors([self._render(_PROBE_TURNS, policy)], prefix=[])
        with self._run_lock, torch.inference_mode():
            out = scoring.generate(
                self.model,
                scoring.to_device(batch, self._loaded.device, self._loaded.dtype),
                self.answer,
                self.tokens.pad_id,
                4,
            )
        prefix: list[int] = []
        for token in out.tokens[0]:
            if self.tokenizer.decode([token]).strip() or token in self.tokens.special_ids.values():
                break
            prefix.append(token)
        return prefix

    # -- prepare (CPU) --------------------------------------------------------------------------------------

    def prepare(self, requests: Sequence[GuardRequest]) -> PreparedBatch:
        """Render, tokenize and tile a batch (CPU only; safe to call from a worker thread).

        One modality per batch unless ``mixes_modalities``; ValueError for a mixed batch otherwise.
        """
        requests = list(requests)
        if not requests:
            raise ValueError("prepare() needs at least one request")
        has_image = any(r.has_image for r in requests)
        if has_image and not all(r.has_image for r in requests) and not self.mixes_modalities:
            raise ValueError(
                "a batch must not mix image and text-only requests here (transformers' Mllama changes the "
                "text rows' logits unless model.reference_cross_attention is on; generate mode never mixes)"
            )
        batch = PreparedBatch(requests, has_image, self.mode)
        segments: list[list[Segment]] = []
        for i, request in enumerate(requests):
            try:
                if len(request.all_images) > self._max_images:
                    raise ValueError(
                        f"{self.family} reads "
                        + (f"at most {self._max_images} image(s)" if self._max_images else "no images")
                        + f"; this request has {len(request.all_images)}"
                    )
                segments.append(self._render(request.turns, request.policy, request.image_positions()))
                batch.rows.append(i)
            except Exception as exc:  # noqa: BLE001 — a bad item must not sink its batch
                batch.errors[i] = EngineError(f"cannot render the prompt: {exc}", detail={"kind": "prepare"})
        pixel_rows: list[dict[str, Any] | None] = []
        kept_rows, kept_segments = [], []
        for i, seg in zip(batch.rows, segments):
            if not requests[i].has_image:
                pixel_rows.append(None)
            else:
                try:
                    pixel_rows.append(self._image_inputs(requests[i].all_images))
                except Exception as exc:  # noqa: BLE001 — the image processor raises many types
                    batch.errors[i] = EngineError(
                        f"cannot preprocess the image: {exc}", detail={"kind": "prepare"}
                    )
                    continue
            kept_rows.append(i)
            kept_segments.append(seg)
        batch.rows, segments = kept_rows, kept_segments
        if batch.rows:
            images = pixel_rows if any(p is not None for p in pixel_rows) else None
            prefix = self.answer_prefix_ids + self.answer_tail if self.mode == "single_pass" else []
            if (
                self.mode == "single_pass"
                and self.share_prefix
                and (images is None or self.shares_image_prefix)
            ):
                self._share_prompt_start(batch, segments, prefix, images)
            if not batch.prefix_keys:
                batch.inputs = self._tensors(segments, prefix=prefix, images=images)
        return batch

    def _share_prompt_start(
        self,
        batch: PreparedBatch,
        segments: list[list[Segment]],
        suffix: list[int],
        images: list[dict[str, Any] | None] | None = None,
    ) -> None:
        """Split rows into a shared prompt start and their own rest, when exact.

        The start of a text-only row is the policy's instructions and categories for its task; that of an
        image row (reference cross-attention only) the tokens before its first ``<|image|>``, which then do
        not depend on the image. Layout per row: [pad..][shared start] then [pad..][rest of the prompt +
        answer prefix + tail]; the attention mask hides the pads and positions count real tokens, so every
        row computes exactly what it would alone. The shared start's keys/values come from ``_prefix_cache``
        at run time.
        """
        keys: list[tuple[str, str]] = []
        rests: list[list[int]] = []
        ids_by_key: dict[tuple[str, str], list[int]] = {}
        row_images = images or [None] * len(batch.rows)
        for i, row_ids, image in zip(batch.rows, self.tokens.encode_many(segments), row_images):
            request = batch.requests[i]
            if image is not None:
                if self.tokens.image_id not in row_ids:
                    return
                start = row_ids[: row_ids.index(self.tokens.image_id)]
                key = ("before-image", " ".join(map(str, start)))
                ids_by_key.setdefault(key, start)
            else:
                role = judged_role(request.turns)
                key = (request.policy.hash, role)
                if key not in ids_by_key:
                    start_segments = shared_text_prefix(role, request.policy, self.family)
                    ids_by_key[key] = self.tokens.encode_many([start_segments])[0]
                start = ids_by_key[key]
                if row_ids[: len(start)] != start:
                    return  # the start does not tokenize on its own boundary here: no sharing for this batch
            if not start:
                return
            keys.append(key)
            rests.append(row_ids[len(start) :] + suffix)
        start_lengths = torch.tensor([len(ids_by_key[k]) for k in keys])
        width = int(start_lengths.max())
        start_mask = (torch.arange(width)[None, :] >= (width - start_lengths)[:, None]).long()
        input_ids, rest_mask, rest_positions = left_pad(rests, self.tokens.pad_id)
        batch.inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.cat([start_mask, rest_mask], dim=1),
            "position_ids": rest_positions + start_lengths[:, None],
        }
        if images is not None:
            batch.inputs.update(self._image_tensors(input_ids, images))
        batch.prefix_keys = keys
        batch.prefix_ids = ids_by_key

    def _prefix_cache(self, batch: PreparedBatch, rows: Sequence[int] | None = None) -> Any:
        """A KV cache holding each row's shared prompt start, left-padded to the batch's widest (model lock held)."""
        from transformers.cache_utils import DynamicCache

        keys = batch.prefix_keys if rows is None else [batch.prefix_keys[r] for r in rows]
        for key in dict.fromkeys(keys):
            if key not in self._prefix_kv:
                ids = torch.tensor([batch.prefix_ids[key]], device=self._loaded.device)
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
                self._prefix_kv[key] = [
                    (layer.keys, layer.values)
                    if getattr(layer, "keys", None) is not None and layer.keys.numel()
                    else None
                    for layer in out.cache.layers
                ]
                while len(self._prefix_kv) > _PREFIX_KV_ENTRIES:
                    self._prefix_kv.popitem(last=False)
            self._prefix_kv.move_to_end(key)
        width = max(len(batch.prefix_ids[k]) for k in keys)
        cache = DynamicCache(config=self.model.config)
        for layer_idx, sample in enumerate(self._prefix_kv[keys[0]]):
            if sample is None:
                continue  # a cross-attention layer: the shared starts see no image
            k0, v0 = sample
            layer_keys = k0.new_zeros((len(keys), k0.shape[1], width, k0.shape[3]))
            layer_values = v0.new_zeros((len(keys), v0.shape[1], width, v0.shape[3]))
            for key in dict.fromkeys(keys):
                k, v = self._prefix_kv[key][layer_idx]
                index = torch.tensor([r for r, kk in enumerate(keys) if kk == key], device=k.device)
                layer_keys[index, :, width - k.shape[2] :] = k
                layer_values[index, :, width - v.shape[2] :] = v
            cache.update(layer_keys, layer_values, layer_idx)
        return cache

    def _render(
        self, turns: Sequence[Turn], policy: Policy, image_turns: Sequence[int] = ()
    ) -> list[Segment]:
        return render_segments(turns, policy, image_turns=tuple(image_turns), family=self.family)

    def _image_inputs(self, images: Sequence[Any]) -> dict[str, Any]:
        if self._family.model_type == "llama4":
            # Llama 4 tiles every image of the request; its tiles go in the order of the <|image|> tokens.
            return dict(self.processor.image_processor(list(images), return_tensors="pt"))
        out = self.processor.image_processor([[images[0]]], return_tensors="pt")
        return dict(out)

    def _llama4_tensors(self, ids: list[list[int]], images: list[dict[str, Any] | None]) -> list[list[int]]:
        """Each row's ``<|image|>`` ids expanded into its images' patch runs (``Llama4Processor``'s scheme)."""
        from worker.engine.families.llama4_images import (
            expand_image_ids,
            expansion_token_ids,
            patches_per_tile,
        )

        token_ids = expansion_token_ids(self.tokenizer)
        out = []
        for row, im in zip(ids, images):
            if im is None:
                out.append(row)
                continue
            tile = int(im["pixel_values"].shape[-1])
            per_tile = patches_per_tile(tile, self.processor.patch_size, self.processor.downsample_ratio)
            out.append(expand_image_ids(row, im["aspect_ratios"].tolist(), per_tile, token_ids))
        return out

    def _tensors(
        self,
        segments: list[list[Segment]],
        *,
        prefix: list[int],
        images: list[dict[str, Any] | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Left-padded ids, masks and positions (+ image tensors) of whole prompts; ``images`` per row, None = text."""
        ids = self.tokens.encode_many(segments)
        if images is not None and self._family.model_type == "llama4":
            ids = self._llama4_tensors(ids, images)
        ids = [row + prefix for row in ids]
        input_ids, attention_mask, position_ids = left_pad(ids, self.tokens.pad_id)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if images is not None:
            inputs.update(self._image_tensors(input_ids, images))
        return inputs

    def _image_tensors(
        self, input_ids: torch.Tensor, images: list[dict[str, Any] | None]
    ) -> dict[str, torch.Tensor]:
        """The image tensors of the rows of ``input_ids`` that carry one (``images[r]``, None for text rows).

        Mllama: the tiles of the image rows only, and each row's cross-attention mask (all zero for text
        rows); when text rows are present, ``image_rows`` says which rows the tiles belong to (``run`` then
        runs the vision encoder on those rows only, see ``_vision_states``).
        """
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense,
            get_cross_attention_token_mask,
        )

        present = [im for im in images if im is not None]
        inputs = {"pixel_values": torch.cat([im["pixel_values"] for im in present])}
        if self._family.model_type == "llama4":
            return inputs
        inputs["aspect_ratio_ids"] = torch.cat([im["aspect_ratio_ids"] for im in present])
        inputs["aspect_ratio_mask"] = torch.cat([im["aspect_ratio_mask"] for im in present])
        num_tiles = [im["num_tiles"][0] if im is not None else [] for im in images]
        token_masks = [
            get_cross_attention_token_mask(row, self.tokens.image_id) for row in input_ids.tolist()
        ]
        inputs["cross_attention_mask"] = torch.from_numpy(
            convert_sparse_cross_attention_mask_to_dense(
                token_masks,
                num_tiles=num_tiles,
                max_num_tiles=self.processor.image_processor.max_image_tiles,
                length=input_ids.shape[1],
            )
        )
        if len(present) < len(images):
            inputs["image_rows"] = torch.tensor([r for r, im in enumerate(images) if im is not None])
        return inputs

    def _vision_states(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A mixed Mllama batch with its tiles replaced by cross-attention states (model lock held).

        The vision encoder and projector run on the image rows only (as ``MllamaModel`` would on all rows);
        text rows get zero states, which the reference masking keeps out of their hidden states.
        """
        if "image_rows" not in inputs:
            return inputs
        inputs = dict(inputs)
        rows = inputs.pop("image_rows")
        core = self.model.model
        vision = core.vision_model(
            pixel_values=inputs.pop("pixel_values"),
            aspect_ratio_ids=inputs.pop("aspect_ratio_ids"),
            aspect_ratio_mask=inputs.pop("aspect_ratio_mask"),
        ).last_hidden_state
        projected = core.multi_modal_projector(vision).reshape(len(rows), -1, core.hidden_size)
        states = projected.new_zeros((inputs["input_ids"].shape[0], *projected.shape[1:]))
        states[rows] = projected
        inputs["cross_attention_states"] = states
        return inputs

    # -- run (model) ----------------------------------------------------------------------------------------

    def run(self, batch: PreparedBatch) -> list[GuardResult | EngineError]:
        """Forward pass (+ greedy decoding of unsafe rows) for a prepared batch; one result per request."""
        results: list[GuardResult | EngineError | None] = [None] * len(batch.requests)
        for i, error in batch.errors.items():
            results[i] = error
        if batch.rows:
            try:
                with self._run_lock, torch.inference_mode():
                    inputs = scoring.to_device(batch.inputs, self._loaded.device, self._loaded.dtype)
                    inputs = self._vision_states(inputs)
                    if batch.mode == "generate":
                        row_results = self._run_generate(batch, inputs)
                    else:
                        row_results = self._run_single_pass(batch, inputs)
            except torch.OutOfMemoryError as exc:
                log.warning("model ran out of memory", extra={"stage": "model", "reason": "out_of_memory"})
                row_results = [
                    EngineError(f"out of memory: {exc}", detail={"kind": "out_of_memory"}) for _ in batch.rows
                ]
            except Exception as exc:  # keep the process alive: every item of the batch gets the error
                log.exception("model failed on a batch", extra={"stage": "model", "reason": "engine_error"})
                row_results = [
                    EngineError(f"model failed: {exc!r}", detail={"kind": "model"}) for _ in batch.rows
                ]
            for i, result in zip(batch.rows, row_results):
                results[i] = result
        return results  # type: ignore[return-value]

    def score_only(self, batch: PreparedBatch) -> list[float]:
        """P(unsafe) of each tensor row of a single-pass batch, from the forward pass alone (no decoding).

        The engine's bare batched scoring, for benchmarks that compare the pipeline against the model.
        """
        if batch.mode != "single_pass":
            raise ValueError("score_only needs a batch prepared in single_pass mode")
        with self._run_lock, torch.inference_mode():
            inputs = self._vision_states(
                scoring.to_device(batch.inputs, self._loaded.device, self._loaded.dtype)
            )
            shared = self._prefix_cache(batch) if batch.prefix_keys else None
            out = scoring.score(
                self.model, inputs, self.answer, self.answer_tail, keep_cache=False, cache=shared
            )
        return out.scores.tolist()

    def _policy_rows(self, batch: PreparedBatch) -> list[Policy]:
        return [batch.requests[i].policy for i in batch.rows]

    def _run_single_pass(
        self, batch: PreparedBatch, inputs: dict[str, torch.Tensor]
    ) -> list[GuardResult | EngineError]:
        policies = self._policy_rows(batch)
        thresholds = torch.tensor([p.threshold for p in policies], dtype=torch.float32)
        tail = self.answer_tail
        # Keep the KV cache: unsafe rows continue from it instead of re-reading their prompts.
        shared = self._prefix_cache(batch) if batch.prefix_keys else None
        code_ids = list(self.code_tokens.values())
        out = scoring.score(
            self.model, inputs, self.answer, tail, keep_cache=True, cache=shared, code_ids=code_ids
        )
        self._check_mass(out.answer_mass)
        unsafe = (out.scores >= thresholds).tolist()
        finite = torch.isfinite(out.scores).tolist()
        scores = out.scores.tolist()
        per_code = out.code_probs.tolist() if out.code_probs is not None else [None] * len(scores)
        cats = [
            category_scores(s, probs, list(self.code_tokens), p.codes) if probs is not None and ok else None
            for s, probs, p, ok in zip(scores, per_code, policies, finite)
        ]
        results: list[GuardResult | EngineError] = [
            GuardResult(score=s, unsafe=False, codes=(), category_scores=c)
            if ok
            # A NaN score compares False against the threshold: it must not pass as "safe".
            else EngineError("model produced a non-finite score", detail={"kind": "non_finite"})
            for s, ok, c in zip(scores, finite, cats)
        ]
        unsafe_rows = [r for r, flag in enumerate(unsafe) if flag and finite[r]]
        if not unsafe_rows:
            return results
        n_unsafe = len(self.answer.unsafe_ids)
        fast = [r for r in unsafe_rows if tail and bool(out.tail_ok[r])]
        slow = [r for r in unsafe_rows if r not in set(fast)]
        if fast:
            # The pass already holds "unsafe\nS" and the next token: continue from its cache.
            first = out.next_ids[torch.as_tensor(fast, device=out.next_ids.device)]
            tokens, ended = scoring.decode_greedy(
                self.model,
                inputs,
                out.cache,
                fast,
                self.answer,
                self.tokens.pad_id,
                self.max_new_tokens - (len(tail) - n_unsafe),
                first_ids=first,
            )
            for r, ids, done in zip(fast, tokens, ended):
                raw = "unsafe" + self.tokenizer.decode(tail[n_unsafe:] + ids, skip_special_tokens=False)
                results[r] = self._codes_result(scores[r], raw, done, policies[r], cats[r])
        if slow:
            # The model would not write the tail itself: decode these rows exactly, from their prompts.
            index = torch.as_tensor(slow, device=inputs["input_ids"].device)
            prompt_inputs = scoring.drop_tail(inputs, len(tail), rows=index)
            shared = self._prefix_cache(batch, slow) if batch.prefix_keys else None
            fresh = scoring.score(self.model, prompt_inputs, self.answer, (), keep_cache=True, cache=shared)
            tokens, ended = scoring.decode_greedy(
                self.model,
                prompt_inputs,
                fresh.cache,
                range(len(slow)),
                self.answer,
                self.tokens.pad_id,
                self.max_new_tokens,
                feed=self.answer.unsafe_ids,
            )
            for r, ids, done in zip(slow, tokens, ended):
                raw = "unsafe" + self.tokenizer.decode(ids, skip_special_tokens=False)
                results[r] = self._codes_result(scores[r], raw, done, policies[r], cats[r])
        return results

    def _codes_result(
        self, score: float, raw: str, ended: bool, policy: Policy, cats: dict[str, float] | None = None
    ) -> GuardResult | EngineError:
        if not ended:
            return EngineError(
                f"answer not finished within model.max_new_tokens={self.max_new_tokens}",
                raw_output=raw,
                detail={"kind": "truncated", "score": score},
            )
        try:
            parsed = parse_codes_continuation(raw.removeprefix("unsafe"), policy.codes)
        except EngineError as exc:
            exc.detail = {"kind": "malformed", "score": score}
            return exc
        return GuardResult(score, True, parsed.codes, parsed.dropped_codes, raw, cats)

    def _run_generate(
        self, batch: PreparedBatch, inputs: dict[str, torch.Tensor]
    ) -> list[GuardResult | EngineError]:
        policies = self._policy_rows(batch)
        out = scoring.generate(self.model, inputs, self.answer, self.tokens.pad_id, self.max_new_tokens)
        results: list[GuardResult | EngineError] = []
        for b, (ids, ended, policy) in enumerate(zip(out.tokens, out.ended, policies)):
            raw = self.tokenizer.decode(ids, skip_special_tokens=False)
            # The answer's first word comes after the whitespace the model emits first.
            step = 0
            while step < len(ids) and not self.tokenizer.decode([ids[step]]).strip():
                step += 1
            if not ended or step >= out.step_logits.shape[0]:
                results.append(
                    EngineError(
                        "answer not finished within model.max_new_tokens",
                        raw_output=raw,
                        detail={"kind": "truncated"},
                    )
                )
                continue
            pair = out.step_logits[step, b]
            score = float(torch.sigmoid(pair[1] - pair[0]))
            try:
                parsed = parse_answer(raw, policy.codes)
            except EngineError as exc:
                exc.detail = {"kind": "malformed", "score": score}
                results.append(exc)
                continue
            results.append(GuardResult(score, parsed.unsafe, parsed.codes, parsed.dropped_codes, raw))
        return results

    def _check_mass(self, mass: torch.Tensor) -> None:
        low = float(mass.min()) < LOW_ANSWER_MASS
        if low and not self._warned_low_mass:
            self._warned_low_mass = True
            log.warning(
                "little probability on safe/unsafe at the answer position: is this a Llama Guard checkpoint, "
                "and is model.answer_prefix right?",
                extra={"stage": "model", "min_answer_mass": round(float(mass.min()), 4)},
            )

    # -- convenience ----------------------------------------------------------------------------------------

    def batches(self, requests: Sequence[GuardRequest]) -> list[list[int]]:
        """Indices of ``requests`` in the batches this engine runs: one modality each, ``batching.max_size`` at most.

        One modality each even where ``mixes_modalities`` allows both: a split pair of passes measured faster
        per item than one mixed pass (see ``mixes_modalities``).
        """
        chunks = []
        for has_image in (False, True):
            indices = [i for i, r in enumerate(requests) if r.has_image == has_image]
            chunks.extend(
                indices[start : start + self.max_batch_size]
                for start in range(0, len(indices), self.max_batch_size)
            )
        return chunks

    def classify(self, requests: Sequence[GuardRequest]) -> list[GuardResult | EngineError]:
        """Classify any list: in ``batches``, each run by ``run_isolated`` (a batch failing as a whole is bisected)."""
        from worker.engine.isolation import classify_in_batches

        return classify_in_batches(self, requests)
