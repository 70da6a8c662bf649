"""Frozen open_clip backbone that returns the last-k block outputs of both CLIP towers.

Architectures are those of the backbone registry (:mod:`shards.backbones`): any open_clip ViT
config, by its name or an OpenAI spelling (``ViT-B/32``, ``ViT-L/14@336px``); the reference's four
are built with QuickGELU (the activation OpenAI's weights were trained with, open_clip's
``-quickgelu`` configs). Weights come from

* ``openai``: OpenAI's checkpoint, from the Hugging Face / open_clip cache or downloaded once;
* a local file: ``.pt`` / ``.bin`` (a state dict, or OpenAI's TorchScript archive) or ``.safetensors``;
* ``random`` / ``random:<seed>``: random weights made after ``torch.manual_seed(seed)``, so every
  run (resume, demo, ``predict``) rebuilds the same backbone. For testing the pipeline only.

The weights are fingerprinted with :func:`weights_sha256`; the store records it so features
made with different weights never mix.

The towers compute in fp32 by default on every device, as the reference does (its tokens are
stored as fp16 afterwards, as ours are); ``precision="fp16"`` runs them under fp16 autocast
instead (faster on GPUs, tokens drift slightly: see docs/extract.md). The store records which.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import open_clip
import torch

from shards.backbones import get_backbone
from shards.device import resolve_device
from shards.errors import ConfigError, R2Error
from shards.manifest import Manifest, make_manifest

log = logging.getLogger(__name__)

_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
PRECISIONS = ("fp32", "fp16")
"""What the CLIP towers may compute in: ``fp32`` (default, the reference) or ``fp16`` autocast."""


class WeightsError(R2Error):
    """CLIP weights that cannot be found, downloaded or loaded into the chosen architecture."""


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict: each tensor's name, dtype, shape and raw bytes, names sorted."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: a state dict (maybe nested or ``module.``-prefixed) or TorchScript."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint: Any = load_file(str(path), device="cpu")
        else:
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except RuntimeError as err:
                if "TorchScript" not in str(err) and "constants.pkl" not in str(err):
                    raise
                checkpoint = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as err:
        raise WeightsError(f"{path}: cannot read CLIP weights ({type(err).__name__}: {err})") from err
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise WeightsError(f"{path}: not a state dict of CLIP weights")
    state = {k.removeprefix("module."): v for k, v in checkpoint.items() if k not in _JIT_EXTRA_KEYS}
    return state


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Copy ``state`` into ``model`` (all keys, same shapes) or raise :class:`WeightsError`."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise WeightsError(f"{path}: weights do not fit {name} ({first[:300]})") from err


def _cached_openai(name: str, cache_dir: str | None) -> Path | None:
    """Path of OpenAI's weights for ``name`` in the Hugging Face or open_clip URL cache, if present."""
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(name, "openai")
    repo = cfg.get("hf_hub", "").rstrip("/")
    for filename in _HF_WEIGHT_FILES if repo else ():
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        if isinstance(found, str):
            return Path(found)
    url = cfg.get("url", "")
    if url:
        legacy = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if legacy.is_file():
            return legacy
    return None


def _offline() -> bool:
    """True when downloads are disabled (``HF_HUB_OFFLINE``) or huggingface.co does not resolve."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return True
    return False


def _openai_weights(name: str, cache_dir: str | None) -> Path:
    """Local path of OpenAI's weights for ``name``; downloads them once when online."""
    if not open_clip.get_pretrained_cfg(name, "openai"):
        raise WeightsError(
            f"OpenAI released no weights for {name}: pass --pretrained PATH with a weights file for it, "
            "or --pretrained random for a pipeline test"
        )
    found = _cached_openai(name, cache_dir)
    if found is not None:
        return found
    how = (
        "pass --pretrained PATH with a local weights file (.pt/.bin/.safetensors, e.g. OpenAI's "
        f"{name.removesuffix('-quickgelu')}.pt), or put open_clip's '{name}' openai weights into the "
        "Hugging Face cache (HF_HOME / HF_HUB_CACHE) or ~/.cache/clip on a machine with internet, "
        "or use --pretrained random for a pipeline test"
    )
    if _offline():
        raise WeightsError(f"OpenAI CLIP weights for {name} are not cached and there is no network: {how}")
    try:
        path = open_clip.pretrained.download_pretrained(
            open_clip.get_pretrained_cfg(name, "openai"), cache_dir=cache_dir
        )
    except Exception as err:
        raise WeightsError(f"downloading OpenAI CLIP weights for {name} failed ({err}): {how}") from err
    return Path(path)


def _parse_random(pretrained: str, seed: int) -> int | None:
    """Seed of a ``random`` / ``random:<seed>`` tag, ``None`` for any other tag."""
    if pretrained == "random":
        return seed
    if pretrained.startswith("random:"):
        try:
            return int(pretrained.split(":", 1)[1])
        except ValueError:
            raise WeightsError(f"bad weights tag {pretrained!r}: use random:<integer seed>") from None
    return None


def warn_random_weights(tag: str) -> None:
    """Log the one warning line that says features come from random weights."""
    log.warning(
        "using RANDOM CLIP weights (%s): features are only good for testing the pipeline; "
        "pass --pretrained openai or a weights file for real features",
        tag,
    )


@dataclass(frozen=True)
class BackboneInfo:
    """What a store's manifest records about the backbone (picklable; no model inside).

    Attributes:
        name: open_clip model name, e.g. ``ViT-B-32-quickgelu``.
        pretrained: ``openai``, the weights file path, or ``random:<seed>``.
        weights_sha256: fingerprint of the weights (:func:`weights_sha256`).
        layers: k, the number of last blocks kept.
        frame_size: input side in pixels (224, 336 for L/14-336).
        video_tokens: P, tokens per frame including CLS (50 for B/32).
        video_width: C, visual width (768 for B/32).
        text_width: Cq, text width (512 for B/32).
        precision: what the towers compute in, one of :data:`PRECISIONS`.
    """

    name: str
    pretrained: str
    weights_sha256: str
    layers: int
    frame_size: int
    video_tokens: int
    video_width: int
    text_width: int
    precision: str

    def manifest(self, dataset: str, fps: float | None) -> Manifest:
        """The manifest of a ``dataset`` store of this backbone's tokens at ``fps`` clips per second
        (``None`` = per video)."""
        return make_manifest(
            dataset=dataset,
            backbone=self.name,
            pretrained=self.pretrained,
            weights_sha256=self.weights_sha256,
            layers=self.layers,
            frame_size=self.frame_size,
            fps=fps,
            video_tokens=self.video_tokens,
            video_width=self.video_width,
            text_width=self.text_width,
            precision=self.precision,
        )


@dataclass(frozen=True)
class ClipBackbone(BackboneInfo):
    """A frozen open_clip model that outputs the raw residual stream of its last ``layers`` blocks.

    Attributes (besides those of :class:`BackboneInfo`):
        model: the open_clip ``CLIP`` module (eval mode, no gradients).
        tokenizer: its open_clip tokenizer.
        device: where the model runs (under fp16 autocast when ``precision`` is ``fp16``).
    """

    model: open_clip.model.CLIP
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device

    def info(self) -> BackboneInfo:
        """The manifest-relevant description of this backbone (without the model)."""
        return BackboneInfo(**{f.name: getattr(self, f.name) for f in fields(BackboneInfo)})

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.precision == "fp16")

    @torch.inference_mode()
    def encode_frames(self, images: torch.Tensor) -> torch.Tensor:
        """Visual tokens of CLIP-normalised images ``(N, 3, S, S)`` -> ``(N, k, P, C)``.

        Entry ``j`` is the output of block ``n - k + j`` (oldest first), before ``ln_post``,
        token 0 = CLS. float32, or float16 with ``precision="fp16"``; on the model's device.
        """
        with self._autocast():
            out = self.model.visual.forward_intermediates(
                images.to(self.device),
                indices=self.layers,
                output_fmt="NLC",
                output_extra_tokens=True,
                intermediates_only=True,
                stop_early=True,
            )
            pairs = zip(out["image_intermediates_prefix"], out["image_intermediates"], strict=True)
            return torch.stack([torch.cat([cls, rest], 1) for cls, rest in pairs], 1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``(B, 77)``: SOT, BPE tokens, EOT, zero padding; longer texts truncated to end in EOT."""
        return self.tokenizer(texts)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> list[torch.Tensor]:
        """Text tokens, one ``(L_i, k, Cq)`` tensor per text: SOT..EOT inclusive, before ``ln_final``.

        The batch runs on the first ``max L_i`` positions only: with the causal mask a position
        never sees later ones, so the result equals the full 77-token forward (up to float
        rounding) at a fraction of the cost. Returned on the model's device.
        """
        if not texts:
            return []
        ids = self.tokenize(texts)
        lengths = (ids.argmax(dim=-1) + 1).tolist()  # EOT has the largest id
        width = max(lengths)
        ids = ids[:, :width].to(self.device)
        model = self.model
        cast = model.transformer.get_cast_dtype()
        blocks = model.transformer.resblocks
        keep_from = len(blocks) - self.layers
        kept = []
        with self._autocast():
            x = model.token_embedding(ids).to(cast) + model.positional_embedding[:width].to(cast)
            mask = model.attn_mask[:width, :width]
            for i, block in enumerate(blocks):
                x = block(x, attn_mask=mask)
                if i >= keep_from:
                    kept.append(x)
            stacked = torch.stack(kept, 2)  # (B, L, k, Cq)
        return [stacked[i, :n] for i, n in enumerate(lengths)]


def load_backbone(
    arch: str = "ViT-B-32",
    pretrained: str = "openai",
    layers: int = 4,
    device: str = "cpu",
    seed: int = 0,
    cache_dir: str | None = None,
    precision: str = "fp32",
) -> ClipBackbone:
    """Build the frozen backbone (eval mode, no gradients) on ``device``.

    Args:
        arch: a backbone of :mod:`shards.backbones`: an open_clip ViT config name or an OpenAI
            spelling (``ViT-B/32``, ``ViT-B/16``, ``ViT-L/14``, ``ViT-L/14@336px``).
        pretrained: ``openai``, a weights file path, ``random`` or ``random:<seed>``.
        layers: k, how many last blocks to keep (1..number of blocks).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        seed: seed of ``random`` weights.
        cache_dir: where to look for / download OpenAI weights (default: Hugging Face cache).
        precision: ``fp32`` (the reference) or ``fp16`` (autocast; faster on GPUs, small drift).

    Raises:
        ConfigError: unknown or unsupported architecture, unknown or unavailable device or precision.
        WeightsError: missing / unreadable / mismatching weights, no network for a first
            download; the message says how to provide weights.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be {' or '.join(PRECISIONS)}, got {precision!r}")
    spec = get_backbone(arch)
    name = spec.model_name
    dev = resolve_device(device)
    blocks = min(spec.vision_layers, spec.text_layers)
    if not 1 <= layers <= blocks:
        raise WeightsError(f"--layers {layers} is out of range for {name}: choose 1..{blocks}")
    random_seed = _parse_random(pretrained, seed)
    if random_seed is not None:
        weights, tag = None, f"random:{random_seed}"
    elif pretrained == "openai":
        weights, tag = _openai_weights(name, cache_dir), "openai"
    else:
        weights = Path(pretrained).expanduser()
        if not weights.is_file():
            raise WeightsError(
                f"weights file {pretrained!r} not found; pass openai, random or an existing "
                ".pt/.bin/.safetensors file"
            )
        tag = str(weights.resolve())
    state = None if weights is None else _read_state_dict(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed if random_seed is None else random_seed)
        model = open_clip.model.CLIP(**open_clip.get_model_config(name))
    if state is None or weights is None:
        warn_random_weights(tag)
    else:
        _load_state(model, state, weights, name)
    digest = weights_sha256(model)
    model.requires_grad_(False).eval().to(dev)
    return ClipBackbone(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        pretrained=tag,
        weights_sha256=digest,
        layers=layers,
        frame_size=spec.frame_size,
        video_tokens=spec.video_tokens,
        video_width=spec.video_width,
        text_width=spec.text_width,
        precision=precision,
        device=dev,
    )
