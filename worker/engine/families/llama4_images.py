"""Llama Guard 4's image inputs without torchvision: tiling, normalisation and the ``<|image|>`` expansion.

transformers ships Llama 4's image processor only on its torchvision backend. On hosts without torchvision
(CPU test machines) ``Llama4PilProcessor`` reads the same ``preprocessor_config.json`` / ``processor_config.json``
and does what ``Llama4ImageProcessor`` + ``Llama4Processor`` do:

- the canvas: among the tile grids of at most ``max_patches`` tiles of ``size`` px, the one needing the least
  upscaling (or, when every grid needs downscaling, the least downscaling), smallest area on ties; upscaling
  is capped at ``size`` per side unless ``resize_to_max_canvas``;
- the image is resized without distortion (bilinear) into that canvas, padded with black on the right and
  bottom, rescaled by 1/255 and normalised in bfloat16 (as the reference does), and cut into row-major tiles;
  with more than one tile a global view (the whole image resized to one tile) follows them;
- ``aspect_ratios`` = (tile rows, tile columns) per image;
- in the token ids, each ``<|image|>`` becomes ``<|image_start|>``, per tile row the tiles' ``<|patch|>`` runs
  separated by ``<|tile_x_separator|>`` and ended by ``<|tile_y_separator|>`` (only with several tiles), then
  ``<|image|>`` and the global view's patches, then ``<|image_end|>``. Patches per tile:
  ``(tile / patch_size)^2 / (1 / pixel_shuffle_ratio^2)``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
PATCH = "<|patch|>"
TILE_X = "<|tile_x_separator|>"
TILE_Y = "<|tile_y_separator|>"
IMAGE = "<|image|>"
EXPANSION_TOKENS = (IMAGE_START, IMAGE_END, PATCH, TILE_X, TILE_Y, IMAGE)


def supported_resolutions(max_num_chunks: int, tile: int) -> list[tuple[int, int]]:
    """Every (height, width) canvas of at most ``max_num_chunks`` tiles, in the reference's order."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for chunks in range(max_num_chunks, 0, -1):
        factors = sorted(
            {f for i in range(1, int(chunks**0.5) + 1) if chunks % i == 0 for f in (i, chunks // i)}
        )
        for h in factors:
            by_ratio[h / (chunks // h)].append((h, chunks // h))
    return [(h * tile, w * tile) for grids in by_ratio.values() for h, w in grids]


def best_fit(
    image_size: tuple[int, int], resolutions: Sequence[tuple[int, int]], resize_to_max_canvas: bool = False
) -> tuple[int, int]:
    """The canvas to resize into (see the module docstring); ``image_size`` is (height, width)."""
    height, width = image_size
    # float32 like the reference's tensors, so ties between canvases resolve the same way.
    targets = np.asarray(resolutions, dtype=np.int64)
    scale_w = (targets[:, 1] / np.float32(width)).astype(np.float32)
    scale_h = (targets[:, 0] / np.float32(height)).astype(np.float32)
    scales = np.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    if len(up):
        chosen = up.max() if resize_to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    candidates = targets[scales == chosen]
    best = candidates[int(np.argmin(candidates[:, 0] * candidates[:, 1]))]
    return int(best[0]), int(best[1])


def max_res_without_distortion(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) of the image's aspect ratio that fits ``target``."""
    height, width = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.floor(height * scale_w), target_h), target_w
    return target_h, min(math.floor(width * scale_h), target_w)


class Llama4PilImageProcessor:
    """``Llama4ImageProcessor``'s output (``pixel_values`` [tiles, 3, H, W], ``aspect_ratios``) with PIL + numpy."""

    def __init__(
        self,
        *,
        size: dict[str, int] | None = None,
        max_patches: int = 16,
        resize_to_max_canvas: bool = False,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        rescale_factor: float = 1 / 255,
        **_: Any,
    ) -> None:
        size = size or {"height": 336, "width": 336}
        if size["height"] != size["width"]:
            raise ValueError("Llama 4 tiles are square: size.height must equal size.width")
        self.tile = int(size["height"])
        self.size = {"height": self.tile, "width": self.tile}
        self.max_patches = int(max_patches)
        self.resize_to_max_canvas = bool(resize_to_max_canvas)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.rescale_factor = float(rescale_factor)
        self._resolutions = supported_resolutions(self.max_patches, self.tile)

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` fields, in the reference's names."""
        return {
            "image_processor_type": "Llama4ImageProcessorFast",
            "processor_class": "Llama4Processor",
            "size": self.size,
            "max_patches": self.max_patches,
            "resize_to_max_canvas": self.resize_to_max_canvas,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "rescale_factor": self.rescale_factor,
            "resample": 2,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
        }

    def _normalize(self, pixels: np.ndarray) -> torch.Tensor:
        # bfloat16, as the reference rescales and normalises (the original model's numerics).
        x = (
            torch.from_numpy(np.ascontiguousarray(pixels).copy()).permute(2, 0, 1).to(torch.bfloat16)
            * self.rescale_factor
        )
        mean = torch.tensor(self.image_mean, dtype=torch.bfloat16)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.bfloat16)[:, None, None]
        return (x - mean) / std

    def preprocess_one(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """(tiles [n, 3, tile, tile] in bfloat16, (rows, columns)) of one image."""
        image = image.convert("RGB")
        size = (image.height, image.width)
        target = best_fit(size, self._resolutions, self.resize_to_max_canvas)
        if not self.resize_to_max_canvas:
            limited = (min(max(size[0], self.tile), target[0]), min(max(size[1], self.tile), target[1]))
        else:
            limited = target
        new_h, new_w = max_res_without_distortion(size, limited)
        new_h, new_w = max(new_h, 1), max(new_w, 1)
        resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.uint8)
        canvas = np.zeros((target[0], target[1], 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = resized
        rows, cols = target[0] // self.tile, target[1] // self.tile
        normalized = self._normalize(canvas)
        tiles = (
            normalized.reshape(3, rows, self.tile, cols, self.tile)
            .permute(1, 3, 0, 2, 4)
            .reshape(-1, 3, self.tile, self.tile)
        )
        if rows * cols > 1:
            global_view = np.asarray(
                image.resize((self.tile, self.tile), Image.Resampling.BILINEAR), dtype=np.uint8
            )
            tiles = torch.cat([tiles, self._normalize(global_view)[None]], dim=0)
        return tiles, (rows, cols)

    def __call__(
        self, images: Sequence[Image.Image], return_tensors: str | None = "pt", **_: Any
    ) -> dict[str, Any]:
        """``pixel_values`` (all images' tiles, concatenated) and ``aspect_ratios`` [images, 2]."""
        flat = list(_flatten(images))
        tiles, ratios = zip(*(self.preprocess_one(image) for image in flat)) if flat else ((), ())
        return {
            "pixel_values": torch.cat(list(tiles)) if tiles else torch.empty(0, 3, self.tile, self.tile),
            "aspect_ratios": torch.tensor(list(ratios), dtype=torch.long).reshape(-1, 2),
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``preprocessor_config.json`` as the reference checkpoint has it."""
        (Path(directory) / PREPROCESSOR_CONFIG).write_text(
            json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Llama4PilImageProcessor:
        """Read a checkpoint's ``preprocessor_config.json`` (or the ``image_processor`` of ``processor_config.json``)."""
        path = Path(directory) / PREPROCESSOR_CONFIG
        if path.is_file():
            return cls(**json.loads(path.read_text()))
        return cls(**json.loads((Path(directory) / PROCESSOR_CONFIG).read_text())["image_processor"])


def _flatten(images: Any):
    for item in images:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item


def image_token_string(aspect_ratio: Sequence[int], patches_per_tile: int) -> str:
    """What one ``<|image|>`` becomes in the text (``Llama4Processor._prompt_split_image``'s scheme)."""
    rows, cols = int(aspect_ratio[0]), int(aspect_ratio[1])
    out = IMAGE_START
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                out += PATCH * patches_per_tile
                if x < cols - 1:
                    out += TILE_X
            out += TILE_Y
    return out + IMAGE + PATCH * patches_per_tile + IMAGE_END


def expansion_token_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of the image-expansion tokens in ``tokenizer``; ValueError naming any that is missing."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in EXPANSION_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"the tokenizer lacks Llama 4 image tokens: {', '.join(missing)}")
    return ids


def patches_per_tile(tile: int, patch_size: int, downsample_ratio: int) -> int:
    """``<|patch|>`` tokens per tile (``Llama4Processor``'s count, after the encoder's pixel shuffle)."""
    return (tile // patch_size) * (tile // patch_size) // downsample_ratio


def expand_image_ids(
    ids: Sequence[int], aspect_ratios: Sequence[Sequence[int]], per_tile: int, token_ids: dict[str, int]
) -> list[int]:
    """``ids`` with the k-th ``<|image|>`` id replaced by image k's run (``image_token_string`` as ids).

    Works on ids, not text, so a user's literal ``<|image|>`` text (never an image token id) stays text.
    """
    image_id = token_ids[IMAGE]
    if sum(1 for i in ids if i == image_id) != len(aspect_ratios):
        raise ValueError("the number of <|image|> tokens differs from the number of images")
    patches = [token_ids[PATCH]] * per_tile
    out: list[int] = []
    k = 0
    for token in ids:
        if token != image_id:
            out.append(token)
            continue
        rows, cols = (int(v) for v in aspect_ratios[k])
        k += 1
        out.append(token_ids[IMAGE_START])
        if rows * cols > 1:
            for _ in range(rows):
                for x in range(cols):
                    out += patches
                    if x < cols - 1:
                        out.append(token_ids[TILE_X])
                out.append(token_ids[TILE_Y])
        out += [image_id, *patches, token_ids[IMAGE_END]]
    return out


class Llama4PilProcessor:
    """A ``Llama4Processor`` stand-in: the checkpoint's tokenizer + ``Llama4PilImageProcessor`` + the expansion."""

    def __init__(
        self,
        image_processor: Llama4PilImageProcessor,
        tokenizer: Any,
        *,
        patch_size: int = 14,
        pixel_shuffle_ratio: float = 0.5,
        **_: Any,
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.patch_size = int(patch_size)
        self.pixel_shuffle_ratio = float(pixel_shuffle_ratio)
        self.downsample_ratio = int(round(1.0 / (self.pixel_shuffle_ratio**2)))
        self.token_ids = expansion_token_ids(tokenizer)
        self.image_token_id = self.token_ids[IMAGE]

    @property
    def patches_per_tile(self) -> int:
        """``<|patch|>`` tokens per tile (after the vision encoder's pixel shuffle)."""
        return patches_per_tile(self.image_processor.tile, self.patch_size, self.downsample_ratio)

    def expand_ids(self, ids: Sequence[int], aspect_ratios: Sequence[Sequence[int]]) -> list[int]:
        """``ids`` with the k-th ``<|image|>`` id replaced by image k's token run (as ids)."""
        return expand_image_ids(ids, aspect_ratios, self.patches_per_tile, self.token_ids)

    def save_pretrained(self, directory: str | Path) -> None:
        """Tokenizer files, ``preprocessor_config.json`` and ``processor_config.json`` (the reference's names)."""
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        (Path(directory) / PROCESSOR_CONFIG).write_text(
            json.dumps(
                {
                    "processor_class": "Llama4Processor",
                    "patch_size": self.patch_size,
                    "pixel_shuffle_ratio": self.pixel_shuffle_ratio,
                    "fake_image_token": IMAGE,
                    "image_token": IMAGE,
                    "start_of_image_token": IMAGE_START,
                    "end_of_image_token": IMAGE_END,
                    "patch_token": PATCH,
                    "tile_x_separator_token": TILE_X,
                    "tile_y_separator_token": TILE_Y,
                },
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> Llama4PilProcessor:
        """Load from a checkpoint directory (the files a real Llama Guard 4 checkpoint has)."""
        from transformers import AutoTokenizer

        directory = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        config_path = directory / PROCESSOR_CONFIG
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        config.pop("image_processor", None)
        return cls(Llama4PilImageProcessor.from_pretrained(directory), tokenizer, **config)
