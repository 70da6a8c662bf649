"""Backbone registry: token geometry of open_clip models, read from open_clip's own model configs.

The table is derived, not written by hand, and nothing is built: open_clip ships one JSON config
per model (``open_clip/model_configs/*.json``), ``hf-hub:`` models keep theirs in the Hugging Face
cache (``open_clip_config.json``), and a timm image tower's geometry is read from the source of the
timm function that builds it (its literal ``model_args`` over the class defaults, parsed with
:mod:`ast`). This module imports neither open_clip nor timm nor torch (``shards/`` stays torch-free).

Image towers: any ViT, i.e. open_clip's own ``VisionTransformer`` or a timm trunk built by timm's
``VisionTransformer``, ``Eva`` (EVA-01/02, Perception Encoder) or ``VisionTransformerRelPos``.
Every stored frame has P = (frame / patch)² + 1 tokens: a global token 0, then the patch grid. Towers
with a class token give it as token 0 (``global_token="cls"``); towers without one (SigLIP's
attention-pooled ViTs, average-pooled ViTs) get the mean of that layer's patch tokens
(``global_token="mean"``). Register tokens are dropped. Convolutional, hybrid and hierarchical towers
(ResNet, ConvNeXt, FastViT, ViTamin, Swin, ViTs with a convolutional stem) are refused.

Text towers: open_clip's own transformer (causal or bidirectional, any tokenizer), or a Hugging Face
encoder whose ``config.json`` is in the local Hugging Face cache (its width is not in open_clip's
config).

Names: one normalizer (:func:`normalize_backbone`) accepts open_clip config names in any case,
a ``-quickgelu`` suffix, ``hf-hub:<repo>`` and the OpenAI / reference spellings (``ViT-B/32``,
``ViT-L/14@336px``). The reference's four backbones (:data:`REFERENCE_BACKBONES`) are OpenAI's CLIP,
trained with QuickGELU: they are named ``ViT-B-32`` ... ``ViT-L-14-336`` and built from open_clip's
``-quickgelu`` configs, so ``ViT-B-32-quickgelu`` (what extracted stores record) and ``ViT-B-32``
(what run configs record) are the same backbone.
"""

from __future__ import annotations

import ast
import copy
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

HF_HUB = "hf-hub:"
"""Prefix of open_clip models named by a Hugging Face repository (``hf-hub:timm/ViT-B-16-SigLIP``)."""

GLOBAL_TOKENS = ("cls", "mean")
"""What token 0 of a stored frame is: the tower's class token, or the mean of the layer's patch tokens."""

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_QUICKGELU = "-quickgelu"
_TIMM_VITS = {
    "vision_transformer": ("_create_vision_transformer", "VisionTransformer"),
    "eva": ("_create_eva", "Eva"),
    "vision_transformer_relpos": ("_create_vision_transformer_relpos", "VisionTransformerRelPos"),
}
"""timm modules whose towers are ViTs: module -> (the function that builds a model, the model class)."""
_TIMM_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "class_token")
_HF_WIDTH_KEYS = ("hidden_size", "d_model")
_HF_LAYER_KEYS = ("num_hidden_layers", "encoder_layers", "num_layers")
_NOT_LITERAL = object()


class TokenDims(NamedTuple):
    """Token dimensions of one backbone as cached by ``extract/`` (and recorded in a store's manifest).

    Attributes:
        video_tokens: P, tokens per frame (global token 0 + patches).
        video_width: C, width of the visual residual stream.
        text_width: Cq, width of the text residual stream.
    """

    video_tokens: int
    video_width: int
    text_width: int


@dataclass(frozen=True)
class Preprocess:
    """How a frame becomes the image tower's input, as open_clip's config for the model says.

    Attributes:
        size: input side in pixels.
        resize_mode: ``shortest`` (short side to ``size``, centre crop), ``squash`` (both sides to
            ``size``, aspect not kept) or ``longest`` (long side to ``size``, padded with ``fill_color``).
        interpolation: ``bicubic`` or ``bilinear`` (``nearest`` is possible, unused by open_clip's configs).
        mean, std: per-channel RGB normalisation of ``x / 255``: ``(x - mean) / std``.
        fill_color: padding value (0..255) of ``longest``.
    """

    size: int
    resize_mode: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fill_color: int = 0

    def record(self) -> dict[str, Any]:
        """The manifest's ``preprocess`` entry (JSON: lists, not tuples; the size is ``frame_size``)."""
        return {
            "resize_mode": self.resize_mode,
            "interpolation": self.interpolation,
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "fill_color": int(self.fill_color),
        }


REFERENCE_PREPROCESS = Preprocess(224, "shortest", "bicubic", OPENAI_MEAN, OPENAI_STD).record()
"""The reference's preprocessing (OpenAI CLIP's), as a manifest records it; stores made before the
manifest recorded it were made this way."""


@dataclass(frozen=True)
class Backbone:
    """Geometry of one open_clip model.

    Attributes:
        name: canonical name (:func:`normalize_backbone`), e.g. ``ViT-L-14-336``.
        model_name: the open_clip config that builds it, e.g. ``ViT-L-14-336-quickgelu``.
        frame_size: input side in pixels (224; 336 for ``ViT-L-14-336``).
        patch_size: patch side in pixels (32, 16, 14).
        video_tokens: P, tokens per frame: (frame_size / patch_size)² patches + the global token 0.
        video_width: C, width of the image tower's blocks.
        text_width: Cq, width of the text tower's blocks.
        vision_layers: blocks of the image tower.
        text_layers: blocks of the text tower.
        global_token: token 0 of a frame, one of :data:`GLOBAL_TOKENS`.
        timm_model: the timm model of the image tower, ``None`` for open_clip's own ViT.
        hf_text_model: the Hugging Face model of the text tower, ``None`` for open_clip's own.
        tokenizer: the Hugging Face tokenizer, ``None`` for open_clip's CLIP BPE tokenizer (offline).
        context_length: tokens per text the tokenizer gives (padded).
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
    global_token: str = "cls"
    timm_model: str | None = None
    hf_text_model: str | None = None
    tokenizer: str | None = None
    context_length: int = 77

    @property
    def token_dims(self) -> TokenDims:
        """(P, C, Cq) of the cached tokens."""
        return TokenDims(self.video_tokens, self.video_width, self.text_width)


class _Vision(NamedTuple):
    height: int
    width: int
    patch: int
    channels: int
    layers: int
    global_token: str
    timm_model: str | None


class _Text(NamedTuple):
    width: int
    layers: int
    hf_model: str | None


def _package_folder(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{package} is not installed (it describes the backbones): pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


@functools.cache
def _configs() -> dict[str, tuple[str, dict[str, Any]]]:
    """open_clip's model configs: lower-case name -> (name, parsed JSON), read once."""
    folder = _package_folder("open_clip", "open_clip_torch") / "model_configs"
    table = {}
    for path in sorted(folder.glob("*.json")):
        table[path.stem.lower()] = (path.stem, json.loads(path.read_text()))
    return table


@functools.cache
def _hub_file(repo: str, filename: str) -> dict[str, Any] | None:
    """A JSON file of Hugging Face repository ``repo`` from the local cache, ``None`` when not cached."""
    from huggingface_hub import try_to_load_from_cache  # no torch; only for hf-hub / HF text towers

    path = try_to_load_from_cache(repo, filename)
    if not isinstance(path, str):
        return None
    parsed: dict[str, Any] = json.loads(Path(path).read_text())
    return parsed


def _literal(node: ast.expr | None) -> Any:
    """The value of a literal expression (lists as tuples), :data:`_NOT_LITERAL` for anything else."""
    try:
        value = ast.literal_eval(node) if node is not None else _NOT_LITERAL
    except (ValueError, TypeError, SyntaxError):
        return _NOT_LITERAL
    return tuple(value) if isinstance(value, list) else value


def _keywords(call: ast.Call) -> dict[str, Any]:
    values = {k.arg: _literal(k.value) for k in call.keywords if k.arg is not None}
    return {k: v for k, v in values.items() if v is not _NOT_LITERAL}


def _returned_dict(function: ast.FunctionDef) -> dict[str, Any]:
    """Literal entries of the dict a function returns (timm's ``_cfg`` helpers)."""
    for sub in ast.walk(function):
        if isinstance(sub, ast.Return) and isinstance(sub.value, ast.Dict):
            pairs = zip(sub.value.keys, sub.value.values, strict=True)
            return {str(k.value): _literal(v) for k, v in pairs if isinstance(k, ast.Constant)}
    return {}


class _TimmModule(NamedTuple):
    """What ``timm/models/<stem>.py`` says, read without importing it.

    Attributes:
        functions: model function -> (the ``_create_*`` function it calls, its literal ``model_args``
            and call keywords).
        defaults: literal ``__init__`` defaults of the module's model class.
        sizes: model -> the ``(input_size, fixed_input_size)`` of each of its pretrained configs.
    """

    functions: dict[str, tuple[str, dict[str, Any]]]
    defaults: dict[str, Any]
    sizes: dict[str, set[tuple[Any, Any]]]


def _pretrained_sizes(
    tree: ast.Module, helpers: dict[str, dict[str, Any]]
) -> dict[str, set[tuple[Any, Any]]]:
    """``(input_size, fixed_input_size)`` of every ``'model.tag': _cfg(...)`` entry of ``default_cfgs``."""
    sizes: dict[str, set[tuple[Any, Any]]] = {}
    for node in tree.body:
        if not (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "default_cfgs" for t in node.targets)
        ):
            continue
        table = node.value.args[0] if isinstance(node.value, ast.Call) and node.value.args else node.value
        if not isinstance(table, ast.Dict):
            continue
        for key, value in zip(table.keys, table.values, strict=True):
            if not (isinstance(key, ast.Constant) and isinstance(value, ast.Call)):
                continue
            helper = value.func.id if isinstance(value.func, ast.Name) else ""
            cfg = {**helpers.get(helper, {}), **_keywords(value)}
            entry = (cfg.get("input_size", _NOT_LITERAL), cfg.get("fixed_input_size", False))
            sizes.setdefault(str(key.value).split(".")[0], set()).add(entry)
    return sizes


@functools.cache
def _timm_module(stem: str) -> _TimmModule:
    """Parse ``timm/models/<stem>.py`` (one of :data:`_TIMM_VITS`)."""
    tree = ast.parse((_package_folder("timm", "timm") / "models" / f"{stem}.py").read_text())
    model_class = _TIMM_VITS[stem][1]
    functions: dict[str, tuple[str, dict[str, Any]]] = {}
    helpers: dict[str, dict[str, Any]] = {}
    defaults: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == model_class:
            init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
            named = init.args.args[len(init.args.args) - len(init.args.defaults) :] + init.args.kwonlyargs
            values = [*init.args.defaults, *init.args.kw_defaults]
            defaults = {a.arg: _literal(v) for a, v in zip(named, values, strict=True)}
        if not isinstance(node, ast.FunctionDef):
            continue
        helpers[node.name] = _returned_dict(node)
        creator, args = "", {}
        for sub in ast.walk(node):
            targets = (
                {t.id for t in sub.targets if isinstance(t, ast.Name)}
                if isinstance(sub, ast.Assign)
                else set()
            )
            if isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Call) and "model_args" in targets:
                args.update(_keywords(sub.value))
            if (
                isinstance(sub, ast.Call)
                and isinstance(sub.func, ast.Name)
                and sub.func.id.startswith("_create_")
            ):
                creator = sub.func.id
                args.update({k: v for k, v in _keywords(sub).items() if k != "pretrained"})
        functions[node.name] = (creator, args)
    return _TimmModule(functions, defaults, _pretrained_sizes(tree, helpers))


def _timm_image_size(module: _TimmModule, name: str) -> Any:
    """The ``img_size`` timm builds model ``name`` with: its own argument, else the input size of its
    pretrained configs (timm passes it when they fix it; all must agree), else the class default."""
    given = module.functions[name][1].get("img_size", _NOT_LITERAL)
    if given is not _NOT_LITERAL:
        return given
    sizes = module.sizes.get(name, set())
    fixed = {size for size, is_fixed in sizes if is_fixed}
    if len(fixed) > 1 or (fixed and len(sizes) > len(fixed)):
        return _NOT_LITERAL
    if fixed:
        (size,) = fixed
        return size[-2:] if isinstance(size, tuple) and len(size) == 3 else _NOT_LITERAL
    return module.defaults.get("img_size", _NOT_LITERAL)


@functools.cache
def _timm_source(name: str) -> str | None:
    """``timm/models/<file>.py`` that defines model ``name``, ``None`` when no timm file does."""
    folder = _package_folder("timm", "timm") / "models"
    pattern = re.compile(rf"^def {re.escape(name)}\(", re.MULTILINE)
    for path in sorted(folder.glob("*.py")):
        if pattern.search(path.read_text()):
            return f"timm/models/{path.name}"
    return None


def _timm_vision(name: str) -> _Vision | str:
    """Geometry of timm model ``name`` as an image tower, or why it is not a ViT."""
    for stem, (creator, _) in _TIMM_VITS.items():
        module = _timm_module(stem)
        if name not in module.functions or module.functions[name][0] != creator:
            continue
        args = {**module.defaults, **module.functions[name][1], "img_size": _timm_image_size(module, name)}
        if any(args.get(key, _NOT_LITERAL) is _NOT_LITERAL for key in _TIMM_KEYS):
            return f"the geometry of timm's {name} cannot be read from timm/models/{stem}.py"
        size = args["img_size"]
        height, width = (size, size) if isinstance(size, int) else size
        cls = "cls" if args["class_token"] else "mean"
        return _Vision(height, width, args["patch_size"], args["embed_dim"], args["depth"], cls, name)
    where = _timm_source(name)
    source = f" ({where})" if where else ""
    return (
        f"its image tower is timm's {name}{source}, not a plain ViT: convolutional, hybrid and "
        "hierarchical towers have no patch-token grid with a global token"
    )


def _vision(cfg: dict[str, Any]) -> _Vision | str:
    """Geometry of the image tower of open_clip ``vision_cfg`` ``cfg``, or why it is refused."""
    if cfg.get("timm_model_name"):
        return _timm_vision(cfg["timm_model_name"])
    if isinstance(cfg.get("layers"), (list, tuple)):
        return "its image tower is a ResNet, not a ViT"
    size = cfg.get("image_size", 224)
    height, width = (size[0], size[1]) if isinstance(size, (list, tuple)) else (size, size)
    patch, channels, layers = cfg.get("patch_size", 16), cfg.get("width", 768), cfg.get("layers", 12)
    return _Vision(height, width, patch, channels, layers, "cls", None)


def _text(cfg: dict[str, Any]) -> _Text | str:
    """Geometry of the text tower of open_clip ``text_cfg`` ``cfg``, or why it cannot be described."""
    hf_model = cfg.get("hf_model_name")
    if not hf_model:
        return _Text(cfg.get("width", 512), cfg.get("layers", 12), None)
    found = _hub_file(hf_model, "config.json")
    if found is None:
        return (
            f"its text tower is the Hugging Face model {hf_model}, whose config.json is not in the local "
            f"Hugging Face cache (download it once: huggingface-cli download {hf_model} config.json)"
        )
    width = next((found[k] for k in _HF_WIDTH_KEYS if isinstance(found.get(k), int)), None)
    layers = next((found[k] for k in _HF_LAYER_KEYS if isinstance(found.get(k), int)), None)
    if width is None or layers is None:
        return f"the width and depth of the Hugging Face model {hf_model} are not in its config.json"
    return _Text(width, layers, hf_model)


def _describe(name: str, model_name: str, config: dict[str, Any]) -> Backbone | str:
    """The :class:`Backbone` of open_clip model config ``config``, or why it is refused."""
    vision = _vision(config.get("vision_cfg", {}))
    if isinstance(vision, str):
        return vision
    text_cfg = config.get("text_cfg", {})
    text = _text(text_cfg)
    if isinstance(text, str):
        return text
    return Backbone(
        name=name,
        model_name=model_name,
        frame_size=int(vision.height),
        patch_size=vision.patch,
        video_tokens=(vision.height // vision.patch) * (vision.width // vision.patch) + 1,
        video_width=vision.channels,
        text_width=text.width,
        vision_layers=vision.layers,
        text_layers=text.layers,
        global_token=vision.global_token,
        timm_model=vision.timm_model,
        hf_text_model=text.hf_model,
        tokenizer=text_cfg.get("hf_tokenizer_name") or text.hf_model,
        context_length=text_cfg.get("context_length", 77),
    )


def normalize_backbone(name: str) -> str:
    """Canonical backbone name.

    ``ViT-B/32``, ``vit-b-32``, ``ViT-B-32-quickgelu`` -> ``ViT-B-32``; ``ViT-L/14@336px`` and
    ``ViT-L-14-336px`` -> ``ViT-L-14-336``; another open_clip config name -> the config's own
    spelling (``vit-h-14-quickgelu`` -> ``ViT-H-14-quickgelu``); ``hf-hub:<repo>`` is kept as
    written. A name open_clip does not know is kept, with slashes made dashes and ``-quickgelu``
    dropped (its geometry then comes from a store).

    Raises:
        ConfigError: the name is empty.
    """
    stripped = name.strip()
    if stripped.lower().startswith(HF_HUB) and stripped[len(HF_HUB) :].strip("/"):
        return HF_HUB + stripped[len(HF_HUB) :].strip("/")
    cleaned = stripped.replace("/", "-")
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


def open_clip_config(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(model name, model config, preprocess config)`` that build backbone ``name`` (any spelling).

    The model config is open_clip's (``vision_cfg``, ``text_cfg``, ...; a fresh copy); the preprocess
    config is the one an ``hf-hub:`` repository ships (empty for open_clip's built-in configs, whose
    preprocessing comes with their pretrained tags).

    Raises:
        ConfigError: empty or unknown name (the message names close matches), an ``hf-hub:`` config
            not in the local Hugging Face cache.
    """
    canonical = normalize_backbone(name)
    if canonical.startswith(HF_HUB):
        repo = canonical[len(HF_HUB) :]
        found = _hub_file(repo, "open_clip_config.json")
        if found is None:
            raise ConfigError(
                f"backbone {name!r}: open_clip_config.json of {repo} is not in the local Hugging Face cache "
                f"(HF_HOME / HF_HUB_CACHE); download it once: huggingface-cli download {repo} "
                "open_clip_config.json"
            )
        return canonical, copy.deepcopy(found.get("model_cfg", found)), dict(found.get("preprocess_cfg", {}))
    model_name = f"{canonical}{_QUICKGELU}" if canonical in REFERENCE_BACKBONES else canonical
    config = _configs().get(model_name.lower())
    if config is None:
        raise ConfigError(_unknown(name, canonical))
    return config[0], copy.deepcopy(config[1]), {}


def _unknown(name: str, canonical: str) -> str:
    """The message for a name no config has, naming the closest accepted names."""
    names = list(REFERENCE_BACKBONES) + [
        n for n, c in _configs().values() if not isinstance(_describe(n, n, c), str)
    ]
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(canonical.lower(), list(by_lower), n=3)
    hint = f" (did you mean {', '.join(by_lower[c] for c in close)}?)" if close else ""
    return (
        f"unknown backbone {name!r}{hint}: use an open_clip model name with a ViT image tower (e.g. "
        "ViT-B-32, ViT-B-16-SigLIP, EVA02-B-16; see open_clip.list_models()), hf-hub:<repo>, or an "
        "OpenAI spelling (ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px)"
    )


def _lookup(name: str) -> Backbone | str:
    """The :class:`Backbone` of ``name``, or the one-line reason it is unknown or refused."""
    try:
        model_name, config, _ = open_clip_config(name)
    except ConfigError as err:
        return str(err)
    found = _describe(normalize_backbone(name), model_name, config)
    if isinstance(found, str):
        return (
            f"backbone {name!r} is not supported: {found}; use an open_clip model with a ViT image tower, "
            "e.g. ViT-B-16, ViT-B-16-SigLIP or EVA02-B-16"
        )
    return found


def find_backbone(name: str) -> Backbone | None:
    """The registry's :class:`Backbone` for ``name`` (any spelling), ``None`` when it is unknown or
    refused (see :func:`get_backbone` for why).

    Raises:
        ConfigError: the name is empty.
    """
    normalize_backbone(name)
    found = _lookup(name)
    return None if isinstance(found, str) else found


def get_backbone(name: str) -> Backbone:
    """The registry's :class:`Backbone` for ``name`` (any spelling, see :func:`normalize_backbone`).

    Raises:
        ConfigError: empty or unknown name (the message names close matches), a refused tower
            (convolutional, hybrid or hierarchical image tower; a Hugging Face text tower whose
            config is not cached), an ``hf-hub:`` config that is not cached.
    """
    found = _lookup(name)
    if isinstance(found, str):
        raise ConfigError(found)
    return found
