"""Backbone registry: token geometry of open_clip models, read from open_clip's own model configs.

The table is derived, not written by hand: open_clip ships one JSON config per model
(``open_clip/model_configs/*.json``); this module reads them from disk without importing
open_clip or torch (``shards/`` stays torch-free). A config whose image tower is open_clip's own
ViT and whose text tower is its own causal transformer (the towers ``extract/`` runs block by
block) gives a :class:`Backbone`: frame size, patch size, P = (frame / patch)² + 1 tokens per
frame (CLS first), widths C and Cq, and the block counts of both towers.

Names: one normalizer (:func:`normalize_backbone`) accepts open_clip config names in any case,
a ``-quickgelu`` suffix and the OpenAI / reference spellings (``ViT-B/32``, ``ViT-L/14@336px``).
The reference's four backbones (:data:`REFERENCE_BACKBONES`) are OpenAI's CLIP, trained with
QuickGELU: they are named ``ViT-B-32`` ... ``ViT-L-14-336`` and built from open_clip's
``-quickgelu`` configs, so ``ViT-B-32-quickgelu`` (what extracted stores record) and ``ViT-B-32``
(what run configs record) are the same backbone.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from shards.errors import ConfigError

REFERENCE_BACKBONES = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")
"""The reference's backbones (OpenAI CLIP), built from open_clip's ``<name>-quickgelu`` configs."""

_QUICKGELU = "-quickgelu"


class TokenDims(NamedTuple):
    """Token dimensions of one CLIP backbone as cached by ``extract/`` (and recorded in a store's manifest).

    Attributes:
        video_tokens: P, tokens per frame (CLS + patches).
        video_width: C, width of the visual residual stream.
        text_width: Cq, width of the text residual stream.
    """

    video_tokens: int
    video_width: int
    text_width: int


@dataclass(frozen=True)
class Backbone:
    """Geometry of one open_clip CLIP model.

    Attributes:
        name: canonical name (:func:`normalize_backbone`), e.g. ``ViT-L-14-336``.
        model_name: the open_clip config that builds it, e.g. ``ViT-L-14-336-quickgelu``.
        frame_size: input side in pixels (224; 336 for ``ViT-L-14-336``).
        patch_size: patch side in pixels (32, 16, 14).
        video_tokens: P, tokens per frame: (frame_size / patch_size)² patches + CLS.
        video_width: C, width of the image tower.
        text_width: Cq, width of the text tower.
        vision_layers: blocks of the image tower.
        text_layers: blocks of the text tower.
    """

    name: str
    model_name: str
    frame_size: int
    patch_size: int
    video_tokens: int
    video_width: int
    text_width: int
    vision_layers: int
    text_layers: int

    @property
    def token_dims(self) -> TokenDims:
        """(P, C, Cq) of the cached tokens."""
        return TokenDims(self.video_tokens, self.video_width, self.text_width)


@functools.cache
def _configs() -> dict[str, tuple[str, dict[str, Any]]]:
    """open_clip's model configs: lower-case name -> (name, parsed JSON), read once."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "open_clip is not installed (its model configs describe the backbones): "
            "pip install open_clip_torch"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model_configs"
    table = {}
    for path in sorted(folder.glob("*.json")):
        table[path.stem.lower()] = (path.stem, json.loads(path.read_text()))
    return table


def _unsupported(config: dict[str, Any]) -> str | None:
    """Why the towers of ``config`` are not ones the registry describes, ``None`` when they are."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if not all(isinstance(vision.get(key), int) for key in ("width", "patch_size", "layers")):
        if vision.get("timm_model_name"):
            return f"its image tower is timm's {vision['timm_model_name']}, not open_clip's ViT"
        return "its image tower is not open_clip's ViT (a ResNet)"
    if "multimodal_cfg" in config or config.get("custom_text"):
        return "it is not a plain CLIP model (custom text tower or CoCa decoder)"
    if text.get("hf_model_name") or not all(isinstance(text.get(key), int) for key in ("width", "layers")):
        return "its text tower is a Hugging Face model, not open_clip's transformer"
    if text.get("hf_tokenizer_name") or text.get("no_causal_mask"):
        return "its text tower is not OpenAI's causal transformer with the CLIP tokenizer"
    return None


def _geometry(name: str, model_name: str, config: dict[str, Any]) -> Backbone:
    vision, text = config["vision_cfg"], config["text_cfg"]
    size = vision["image_size"]
    height, width = (size[0], size[1]) if isinstance(size, (list, tuple)) else (size, size)
    patch = vision["patch_size"]
    return Backbone(
        name=name,
        model_name=model_name,
        frame_size=int(height),
        patch_size=patch,
        video_tokens=(height // patch) * (width // patch) + 1,
        video_width=vision["width"],
        text_width=text["width"],
        vision_layers=vision["layers"],
        text_layers=text["layers"],
    )


def normalize_backbone(name: str) -> str:
    """Canonical backbone name.

    ``ViT-B/32``, ``vit-b-32``, ``ViT-B-32-quickgelu`` -> ``ViT-B-32``; ``ViT-L/14@336px`` and
    ``ViT-L-14-336px`` -> ``ViT-L-14-336``; another open_clip config name -> the config's own
    spelling (``vit-h-14-quickgelu`` -> ``ViT-H-14-quickgelu``). A name open_clip does not know is
    kept, with slashes made dashes and ``-quickgelu`` dropped (its geometry then comes from a store
    or the config).

    Raises:
        ConfigError: the name is empty.
    """
    cleaned = name.strip().replace("/", "-")
    if not cleaned:
        raise ConfigError("the backbone name is empty; name an open_clip model, e.g. ViT-B-32 or ViT-L/14")
    cleaned = re.sub(r"@(\d+)(px)?$", r"-\1", cleaned, flags=re.IGNORECASE)
    cleaned = re.sub(r"-(\d+)px$", r"-\1", cleaned, flags=re.IGNORECASE)
    base = re.sub(f"{_QUICKGELU}$", "", cleaned, flags=re.IGNORECASE)
    reference = {r.lower(): r for r in REFERENCE_BACKBONES}
    configs = _configs()
    if base.lower() in reference:
        return reference[base.lower()]
    for key in (cleaned.lower(), base.lower()):
        if key in configs:
            return configs[key][0]
    return base


def find_backbone(name: str) -> Backbone | None:
    """The registry's :class:`Backbone` for ``name`` (any spelling), ``None`` when open_clip has no
    such config or its towers are not supported yet (see :func:`get_backbone` for why).

    Raises:
        ConfigError: the name is empty.
    """
    canonical = normalize_backbone(name)
    model_name = f"{canonical}{_QUICKGELU}" if canonical in REFERENCE_BACKBONES else canonical
    found = _configs().get(model_name.lower())
    if found is None or _unsupported(found[1]) is not None:
        return None
    return _geometry(canonical, found[0], found[1])


def get_backbone(name: str) -> Backbone:
    """The registry's :class:`Backbone` for ``name`` (any spelling, see :func:`normalize_backbone`).

    Raises:
        ConfigError: empty or unknown name (the message names close matches), or an open_clip
            config whose towers are not supported yet (timm, ResNet or Hugging Face towers).
    """
    found = find_backbone(name)
    if found is not None:
        return found
    canonical = normalize_backbone(name)
    config = _configs().get(canonical.lower())
    if config is not None:
        raise ConfigError(
            f"backbone {name!r} is not supported yet: {_unsupported(config[1])}; "
            "use an open_clip ViT config such as ViT-B-32, ViT-L-14-336 or ViT-H-14"
        )
    names = list(REFERENCE_BACKBONES) + [n for n, c in _configs().values() if _unsupported(c) is None]
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(canonical.lower(), list(by_lower), n=3)
    hint = f" (did you mean {', '.join(by_lower[c] for c in close)}?)" if close else ""
    raise ConfigError(
        f"unknown backbone {name!r}{hint}: use an open_clip ViT config name (e.g. ViT-B-32, ViT-H-14) "
        "or an OpenAI spelling (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px)"
    )
