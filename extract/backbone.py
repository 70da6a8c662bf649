"""Frozen open_clip backbone that returns the last-k block outputs of both towers.

Architectures are those of the backbone registry (:mod:`shards.backbones`): any open_clip model
whose image tower is a ViT (open_clip's own, or a timm ViT / EVA trunk: SigLIP, SigLIP 2, EVA-02,
PE, MetaCLIP, DFN ...), by its name, ``hf-hub:<repo>`` or an OpenAI spelling (``ViT-B/32``,
``ViT-L/14@336px``); the reference's four are built with QuickGELU (the activation OpenAI's weights
were trained with, open_clip's ``-quickgelu`` configs). Weights come from

* a tag of open_clip's (``openai``, ``webli``, ``merged2b_s8b_b131k`` ...; for an ``hf-hub:`` name any
  tag means the repository's own weights, recorded as ``hf-hub``): from the Hugging Face / open_clip
  cache, or downloaded once;
* a local file: ``.pt`` / ``.bin`` (a state dict, or OpenAI's TorchScript archive) or ``.safetensors``;
* ``random`` / ``random:<seed>``: random weights made after ``torch.manual_seed(seed)``, so every
  run (resume, demo, ``predict``) rebuilds the same backbone. For testing the pipeline only.

The weights are fingerprinted with :func:`weights_sha256`; the store records it so features
made with different weights never mix.

One mechanism takes the tokens of every family: forward hooks on the last k blocks of each tower's
block list (:func:`tower_blocks`: open_clip's ``transformer.resblocks``, timm's ``trunk.blocks``, a
Hugging Face encoder's layers) while the tower runs its own forward. Token 0 of a frame is the class
token where the tower has one, else the mean of that layer's patch tokens
(:data:`~shards.backbones.GLOBAL_TOKENS`); register tokens are dropped. With ``token_pool=N`` the
patch grid is average-pooled in N x N blocks after token 0 is taken (:func:`pool_patches`; SigLIP
B/16's 14 x 14 grid pooled 2 x 2: 49 + 1 tokens, as many as B/32's). A text keeps the positions
up to its last non-padding token (L = that position + 1, at least 1): OpenAI BPE gives SOT ... EOT,
a sentencepiece or WordPiece tokenizer its word pieces and the end token it adds (when that is not
its padding id). Causal text towers run on the batch's first ``max L`` positions (exact under the
causal mask, and cheaper); bidirectional ones (SigLIP, CLIPA) on the full padded context, as they
were trained.

The towers compute in fp32 by default on every device, as the reference does (its tokens are
stored as fp16 afterwards, as ours are); ``precision="fp16"`` runs them under fp16 autocast
instead (faster on GPUs, tokens drift slightly: see docs/extract.md). The store records which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import open_clip
import torch

from shards.backbones import HF_HUB, Backbone, Preprocess, get_backbone, open_clip_config
from shards.device import resolve_device
from shards.errors import ConfigError, R2Error
from shards.manifest import Manifest, make_manifest, pooled_tokens

log = logging.getLogger(__name__)

_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_WEIGHT_SUFFIXES = (".pt", ".bin", ".safetensors")
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
PRECISIONS = ("fp32", "fp16")
"""What the CLIP towers may compute in: ``fp32`` (default, the reference) or ``fp16`` autocast."""
_BLOCK_LISTS = (
    "transformer.resblocks",
    "trunk.blocks",
    "transformer.encoder.layer",
    "transformer.encoder.block",
    "transformer.block",
    "transformer.layers",
)
"""Where towers keep their blocks: open_clip's transformer, a timm trunk, Hugging Face BERT / T5 / M2M100."""


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


def _weights_cfg(name: str, tag: str) -> dict[str, Any]:
    """open_clip's download config of ``tag`` for model ``name`` (an ``hf-hub:`` name: its repository)."""
    if name.startswith(HF_HUB):
        return {"hf_hub": name[len(HF_HUB) :] + "/"}
    cfg: dict[str, Any] = open_clip.get_pretrained_cfg(name, tag)
    if cfg:
        return cfg
    if tag == "openai":
        raise WeightsError(
            f"OpenAI released no weights for {name}: pass --pretrained PATH with a weights file for it, "
            "or --pretrained random for a pipeline test"
        )
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
    raise WeightsError(
        f"open_clip has no weights tagged {tag!r} for {name} (its tags: {tags}): pass one of them, "
        "--pretrained PATH with a weights file, or --pretrained random for a pipeline test"
    )


def _cached_weights(cfg: dict[str, Any], cache_dir: str | None) -> Path | None:
    """Path of the weights of download config ``cfg`` in the Hugging Face or open_clip URL cache, if there."""
    from huggingface_hub import try_to_load_from_cache

    repo, filename = os.path.split(cfg.get("hf_hub", ""))
    for name in (filename,) if filename else _HF_WEIGHT_FILES if repo else ():
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
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


def _tagged_weights(name: str, tag: str, cache_dir: str | None) -> Path:
    """Local path of the weights tagged ``tag`` for ``name``; downloads them once when online."""
    cfg = _weights_cfg(name, tag)
    found = _cached_weights(cfg, cache_dir)
    if found is not None:
        return found
    what = "OpenAI CLIP" if tag == "openai" else f"the {tag!r}"
    example = f", e.g. OpenAI's {name.removesuffix('-quickgelu')}.pt" if tag == "openai" else ""
    how = (
        f"pass --pretrained PATH with a local weights file (.pt/.bin/.safetensors{example}), or put "
        f"open_clip's '{name}' {tag} weights into the Hugging Face cache (HF_HOME / HF_HUB_CACHE) or "
        "~/.cache/clip on a machine with internet, or use --pretrained random for a pipeline test"
    )
    if _offline():
        raise WeightsError(f"{what} weights for {name} are not cached and there is no network: {how}")
    try:
        path = open_clip.pretrained.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as err:
        raise WeightsError(f"downloading {what} weights for {name} failed ({err}): {how}") from err
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


def tower_blocks(tower: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of ``tower``, in order: the first non-empty ``ModuleList`` / ``Sequential`` at one of
    :data:`_BLOCK_LISTS`.

    ``tower`` is an image tower (``model.visual``) or a text tower (``model.text``, or the CLIP model
    itself, which holds open_clip's built-in text transformer).

    Raises:
        ConfigError: ``tower`` has none of them (a tower the registry should have refused).
    """
    for path in _BLOCK_LISTS:
        found: Any = tower
        for part in path.split("."):
            found = getattr(found, part, None)
        if isinstance(found, torch.nn.ModuleList | torch.nn.Sequential) and len(found) > 0:
            return list(found)
    raise ConfigError(f"{type(tower).__name__} has no block list at {', '.join(_BLOCK_LISTS)}")


@contextmanager
def _tap(blocks: list[torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect the output of each of ``blocks`` (in call order) while the context is open."""
    outputs: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [block.register_forward_hook(keep) for block in blocks]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def prefix_tokens(visual: torch.nn.Module) -> tuple[int, bool]:
    """``(n, has_class_token)``: how many tokens precede the patch grid in the blocks of image tower
    ``visual`` (class and register tokens), and whether the first is a class token."""
    trunk: Any = getattr(visual, "trunk", visual)
    if hasattr(trunk, "num_prefix_tokens"):
        return int(trunk.num_prefix_tokens), getattr(trunk, "cls_token", None) is not None
    if hasattr(visual, "class_embedding"):
        return 1, True
    raise ConfigError(f"{type(visual).__name__}: cannot tell where its patch tokens start")


def pool_patches(patches: torch.Tensor, pool: int) -> torch.Tensor:
    """``(..., (g / pool)², C)``: the means of the ``pool`` x ``pool`` blocks of a g x g patch grid
    ``(..., g², C)`` (row by row), in the grid's order; ``pool`` must divide g
    (:func:`shards.manifest.pooled_tokens` checks that)."""
    if pool == 1:
        return patches
    side = math.isqrt(patches.shape[-2])
    blocks = patches.unflatten(-2, (side // pool, pool, side // pool, pool))
    return blocks.mean(dim=(-4, -2)).flatten(-3, -2)


def _text_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the text transformer: ``model.text``, or the CLIP model itself."""
    tower: torch.nn.Module = getattr(model, "text", model)
    return tower


def _own_transformer(tower: torch.nn.Module) -> bool:
    """Whether ``tower`` is open_clip's text transformer without an appended class token (not CoCa's)."""
    return hasattr(tower, "token_embedding") and getattr(tower, "cls_emb", None) is None


def _run_text(model: Any, ids: torch.Tensor) -> None:
    """Run the text tower's blocks on token ids ``(B, W)`` (``W`` up to the context length).

    open_clip's own transformer runs embedding + blocks (any ``W``; the causal mask cut to ``W``);
    other towers run their own forward.
    """
    tower: Any = _text_tower(model)
    if not _own_transformer(tower):
        model.encode_text(ids)
        return
    width = ids.shape[1]
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(ids).to(cast) + tower.positional_embedding[:width].to(cast)
    mask = tower.attn_mask
    tower.transformer(x, attn_mask=None if mask is None else mask[:width, :width])


class _StandInTokenizer:
    """open_clip's CLIP BPE tokenizer with its ids folded into another vocabulary (``1..vocab-1``;
    0 = padding): the text input of random-weight backbones whose own tokenizer is not available."""

    def __init__(self, context_length: int, vocab_size: int) -> None:
        self.bpe = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        self.vocab_size = vocab_size

    def __call__(self, texts: list[str]) -> torch.Tensor:
        ids = self.bpe(texts)
        return torch.where(ids == 0, ids, 1 + ids % (self.vocab_size - 1))


def _load_tokenizer(
    spec: Backbone, model: torch.nn.Module, random_weights: bool
) -> tuple[Callable[[list[str]], torch.Tensor], int]:
    """The model's tokenizer and its padding id.

    A Hugging Face tokenizer needs ``transformers`` and its files (cached or downloaded). When it
    cannot be loaded and the weights are random, a stand-in (:class:`_StandInTokenizer`) is used.

    Raises:
        WeightsError: the tokenizer cannot be loaded for real weights.
    """
    try:
        tokenizer = open_clip.get_tokenizer(spec.model_name)
    except Exception as err:
        cause = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        if not random_weights:
            raise WeightsError(
                f"the tokenizer of {spec.model_name} (Hugging Face {spec.tokenizer}) cannot be loaded "
                f"({cause}): pip install 'r2tuning-toolkit[hf]' (transformers, sentencepiece; in this "
                "checkout: .venv/bin/pip install -e '.[hf]'), and run once with internet or put "
                "it in the Hugging Face cache (HF_HOME / HF_HUB_CACHE)"
            ) from err
        log.warning(
            "the tokenizer of %s (Hugging Face %s) is not available (%s); with random weights the text "
            "tokens come from a stand-in (CLIP BPE ids folded into its vocabulary)",
            spec.model_name,
            spec.tokenizer,
            cause,
        )
        vocab: Any = getattr(_text_tower(model), "vocab_size", None) or getattr(model, "vocab_size", 49408)
        return _StandInTokenizer(spec.context_length, int(vocab)), 0
    pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None)
    return tokenizer, 0 if pad is None else int(pad)


def _preprocess(spec: Backbone, tag: str | None, hub: dict[str, Any]) -> Preprocess:
    """The model's preprocessing: open_clip's defaults, then the ``hf-hub:`` repository's config, then
    the pretrained tag's (for random or file weights: the model's first tag, what it was trained with)."""
    merged = dataclasses.asdict(open_clip.transform.PreprocessCfg())
    hub_name = spec.model_name.startswith(HF_HUB)
    tags = [] if hub_name else open_clip.list_pretrained_tags_by_model(spec.model_name)
    chosen = tag if tag in tags else tags[0] if tags else None
    overlay = {**hub, **(open_clip.get_pretrained_cfg(spec.model_name, chosen) if chosen else {})}
    merged.update({k: v for k, v in overlay.items() if k in merged})
    return Preprocess(
        size=spec.frame_size,
        resize_mode=str(merged["resize_mode"]),
        interpolation=str(merged["interpolation"]),
        mean=tuple(float(m) for m in merged["mean"]),
        std=tuple(float(s) for s in merged["std"]),
        fill_color=int(merged["fill_color"]),
    )


def _build(config: dict[str, Any]) -> torch.nn.Module:
    """The open_clip model of ``config`` (open_clip's own class choice: CLIP, CustomTextCLIP or CoCa),
    with random weights: no tower fetches pretrained weights of its own."""
    cfg = dict(config)
    vision, text = dict(cfg.pop("vision_cfg")), dict(cfg.pop("text_cfg"))
    if vision.get("timm_model_name"):
        vision["timm_model_pretrained"] = False
    if text.get("hf_model_name"):
        text["hf_model_pretrained"] = False
    custom = bool(cfg.pop("custom_text", False)) or bool(text.get("hf_model_name"))
    if "multimodal_cfg" in cfg:
        model_class: Any = open_clip.CoCa
    else:
        model_class = open_clip.CustomTextCLIP if custom else open_clip.model.CLIP
    model: torch.nn.Module = model_class(**cfg, vision_cfg=vision, text_cfg=text)
    return model


@dataclass(frozen=True)
class BackboneInfo:
    """What a store's manifest records about the backbone (picklable; no model inside).

    Attributes:
        name: open_clip model name, e.g. ``ViT-B-32-quickgelu``.
        pretrained: a tag (``openai`` ...; ``hf-hub`` for an ``hf-hub:`` repository's own weights),
            the weights file path, or ``random:<seed>``.
        weights_sha256: fingerprint of the weights (:func:`weights_sha256`).
        layers: k, the number of last blocks kept.
        frame_size: input side in pixels (224, 336 for L/14-336).
        video_tokens: P, tokens per frame including the global token 0 (50 for B/32), after
            ``token_pool``.
        video_width: C, visual width (768 for B/32).
        text_width: Cq, text width (512 for B/32).
        precision: what the towers compute in, one of :data:`PRECISIONS`.
        global_token: token 0 of a frame, one of :data:`~shards.backbones.GLOBAL_TOKENS`.
        preprocess: how frames must be made for the image tower (the model's own config).
        token_pool: N, the side of the blocks of the patch grid averaged into one token (1: none).
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
    global_token: str
    preprocess: Preprocess
    token_pool: int

    def manifest(self, dataset: str, fps: float | None, dtype: str = "float16") -> Manifest:
        """The manifest of a ``dataset`` store of this backbone's tokens at ``fps`` clips per second
        (``None`` = per video), stored as ``dtype`` (``float16``, or ``int8``: :mod:`shards.quant`).

        Raises:
            ConfigError: ``dtype`` is neither.
        """
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
            global_token=self.global_token,
            preprocess=self.preprocess.record(),
            dtype=dtype,
            token_pool=self.token_pool,
        )


@dataclass(frozen=True)
class ClipBackbone(BackboneInfo):
    """A frozen open_clip model that outputs the raw residual stream of its last ``layers`` blocks.

    Attributes (besides those of :class:`BackboneInfo`):
        model: the open_clip model (``CLIP``, ``CustomTextCLIP`` or ``CoCa``; eval mode, no gradients).
        tokenizer: its tokenizer: texts -> ids ``(B, context length)``, right-padded with ``pad_id``.
        pad_id: the tokenizer's padding id.
        device: where the model runs (under fp16 autocast when ``precision`` is ``fp16``).
    """

    model: Any
    tokenizer: Callable[[list[str]], torch.Tensor]
    pad_id: int
    device: torch.device

    def info(self) -> BackboneInfo:
        """The manifest-relevant description of this backbone (without the model)."""
        return BackboneInfo(**{f.name: getattr(self, f.name) for f in fields(BackboneInfo)})

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.precision == "fp16")

    @torch.inference_mode()
    def encode_frames(self, images: torch.Tensor) -> torch.Tensor:
        """Visual tokens of normalised images ``(N, 3, S, S)`` (see :attr:`preprocess`) -> ``(N, k, P, C)``.

        Entry ``j`` is the output of block ``n - k + j`` (oldest first), before the final norm; token
        0 is the class token, or the mean of the block's patch tokens (:attr:`global_token`), then
        the patch grid row by row, its :attr:`token_pool` x :attr:`token_pool` blocks averaged
        (:func:`pool_patches`). float32, or float16 with ``precision="fp16"``; on the model's device.
        """
        visual = self.model.visual
        prefix, has_class_token = prefix_tokens(visual)
        with self._autocast(), _tap(tower_blocks(visual)[-self.layers :]) as outputs:
            self.model.encode_image(images.to(self.device))
        blocks = torch.stack(outputs, 1)
        patches = blocks[:, :, prefix:]
        first = blocks[:, :, :1] if has_class_token else patches.mean(2, keepdim=True)
        return torch.cat([first, pool_patches(patches, self.token_pool)], 2)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``(B, context length)``, right-padded with :attr:`pad_id` (OpenAI BPE: SOT, BPE
        tokens, EOT, zeros; longer texts truncated to end in EOT)."""
        return self.tokenizer(texts)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> list[torch.Tensor]:
        """Text tokens, one ``(L_i, k, Cq)`` tensor per text, before the final norm.

        ``L_i`` is the position of the text's last non-padding token + 1 (at least 1): SOT..EOT
        inclusive for OpenAI BPE. A causal tower runs on the batch's first ``max L_i`` positions only
        (a position never sees later ones, so this equals the full forward up to float rounding, at a
        fraction of the cost); a bidirectional one on the full padded context. On the model's device.
        """
        if not texts:
            return []
        ids = self.tokenize(texts)
        positions = torch.arange(1, ids.shape[1] + 1)
        lengths = (positions * (ids != self.pad_id)).amax(dim=1).clamp(min=1)
        tower = _text_tower(self.model)
        causal = _own_transformer(tower) and getattr(tower, "attn_mask", None) is not None
        width = int(lengths.max()) if causal else ids.shape[1]
        with self._autocast(), _tap(tower_blocks(tower)[-self.layers :]) as outputs:
            _run_text(self.model, ids[:, :width].to(self.device))
        stacked = torch.stack(outputs, 2)  # (B, width, k, Cq)
        return [stacked[i, :n] for i, n in enumerate(lengths.tolist())]


def load_backbone(
    arch: str = "ViT-B-32",
    pretrained: str = "openai",
    layers: int = 4,
    device: str = "cpu",
    seed: int = 0,
    cache_dir: str | None = None,
    precision: str = "fp32",
    token_pool: int = 1,
) -> ClipBackbone:
    """Build the frozen backbone (eval mode, no gradients) on ``device``.

    Args:
        arch: a backbone of :mod:`shards.backbones`: an open_clip model name with a ViT image tower,
            ``hf-hub:<repo>``, or an OpenAI spelling (``ViT-B/32``, ``ViT-B/16``, ``ViT-L/14``,
            ``ViT-L/14@336px``).
        pretrained: a tag of open_clip's for ``arch`` (``openai``, ``webli`` ...), a weights file
            path, ``random`` or ``random:<seed>``.
        layers: k, how many last blocks to keep (1..number of blocks of the shallower tower).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        seed: seed of ``random`` weights.
        cache_dir: where to look for / download tagged weights (default: Hugging Face cache).
        precision: ``fp32`` (the reference) or ``fp16`` (autocast; faster on GPUs, small drift).
        token_pool: N: average the patch grid in N x N blocks (token 0 kept; 1: the whole grid).

    Raises:
        ConfigError: unknown or unsupported architecture, unknown or unavailable device or precision,
            a ``token_pool`` that does not divide the patch grid (the message names its divisors).
        WeightsError: missing / unreadable / mismatching weights, no network for a first
            download, a tokenizer that cannot be loaded; the message says how to provide them.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be {' or '.join(PRECISIONS)}, got {precision!r}")
    spec = get_backbone(arch)
    name, config, hub_preprocess = open_clip_config(arch)
    video_tokens = pooled_tokens(spec.video_tokens, token_pool, name)
    dev = resolve_device(device)
    blocks = min(spec.vision_layers, spec.text_layers)
    if not 1 <= layers <= blocks:
        raise WeightsError(f"--layers {layers} is out of range for {name}: choose 1..{blocks}")
    random_seed = _parse_random(pretrained, seed)
    tag: str | None = None
    if random_seed is not None:
        weights, recorded = None, f"random:{random_seed}"
    elif Path(pretrained).expanduser().is_file():
        weights = Path(pretrained).expanduser()
        recorded = str(weights.resolve())
    elif os.sep in pretrained or "/" in pretrained or Path(pretrained).suffix in _WEIGHT_SUFFIXES:
        raise WeightsError(
            f"weights file {pretrained!r} not found; pass a tag (openai ...), random or an existing "
            ".pt/.bin/.safetensors file"
        )
    else:
        tag = pretrained
        weights = _tagged_weights(name, tag, cache_dir)
        recorded = "hf-hub" if name.startswith(HF_HUB) else tag
    state = None if weights is None else _read_state_dict(weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed if random_seed is None else random_seed)
        model = _build(config)
    if state is None or weights is None:
        warn_random_weights(recorded)
    else:
        if not isinstance(model, open_clip.model.CLIP):
            state = open_clip.model.convert_to_custom_text_state_dict(state)
        _load_state(model, state, weights, name)
    digest = weights_sha256(model)
    model.requires_grad_(False).eval().to(dev)
    tokenizer, pad_id = _load_tokenizer(spec, model, random_weights=weights is None)
    return ClipBackbone(
        model=model,
        tokenizer=tokenizer,
        pad_id=pad_id,
        name=name,
        pretrained=recorded,
        weights_sha256=digest,
        layers=layers,
        frame_size=spec.frame_size,
        video_tokens=video_tokens,
        video_width=spec.video_width,
        text_width=spec.text_width,
        precision=precision,
        global_token=spec.global_token,
        preprocess=_preprocess(spec, tag, hub_preprocess),
        token_pool=token_pool,
        device=dev,
    )
