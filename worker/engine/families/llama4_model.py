"""``Llama4ForConditionalGeneration`` with a working forward pass for inference and training.

transformers 5.24's ``Llama4ForConditionalGeneration.forward`` builds its output from the language model's
``MoeCausalLMOutputWithPast`` and reads an ``image_outputs`` field that class does not have, so every
return-dict forward raises ``AttributeError``. ``GuardLlama4ForConditionalGeneration`` is the same model
(same config class, same weight names, loaded by the same ``from_pretrained``) with the forward written out:
image tiles through the vision tower and projector, scattered into the ``<|patch|>`` positions, then the
language model. Decoding steps that carry no ``<|patch|>`` token skip the vision tower (the image is already
in the cache), whatever ``generate`` passes along.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Llama4ForConditionalGeneration


class GuardLlama4ForConditionalGeneration(Llama4ForConditionalGeneration):
    """Llama 4 (Llama Guard 4) with the forward pass described in the module docstring."""

    def forward(  # noqa: PLR0913 — transformers' forward signature
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        """Logits (and cache) of the language model over text + image embeddings."""
        kwargs.pop("past_key_values", None) if cache is not None else None
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if (
            pixel_values is not None
            and input_ids is not None
            and bool((input_ids == self.config.image_token_id).any())
        ):
            features = self.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
            projected = self.multi_modal_projector(features.reshape(-1, features.size(-1))).to(
                inputs_embeds.device, inputs_embeds.dtype
            )
            mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=projected)
            inputs_embeds = inputs_embeds.masked_scatter(mask, projected)
        return self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
