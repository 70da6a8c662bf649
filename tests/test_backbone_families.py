"""Backbone families beyond OpenAI's CLIP: SigLIP, SigLIP 2, EVA-02, timm trunks, hf-hub names.

Registry side (shards/backbones.py): geometry read without building anything, checked against timm's
own builds on the meta device; refusals and suggestions. Extraction side (extract/backbone.py): random
``pretrained=None`` towers built offline, their last-k block taps compared with the blocks run by hand,
the global token 0 (class token, or the mean of the patch tokens), the text positions kept, the
preprocessing and the manifest fields. SigLIP's tokenizer is a Hugging Face tokenizer (``transformers``
plus a download); offline the text side is tested with token ids constructed here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import huggingface_hub.constants
import open_clip
import pytest
import timm
import torch

import extract.backbone as backbone_module
import shards.backbones as registry
from extract.backbone import ClipBackbone, WeightsError, load_backbone, prefix_tokens, tower_blocks
from shards.backbones import OPENAI_MEAN, get_backbone, open_clip_config
from shards.errors import ConfigError, StoreError
from shards.store import create_store, open_store
from train.config import get_preset

LAYERS = 3
TEXTS = ["a person opens the fridge.", "dog"]


@pytest.mark.parametrize(
    ("name", "dims", "frame", "token"),
    [
        ("ViT-B-32", (50, 768, 512), 224, "cls"),
        ("ViT-L-14", (257, 1024, 768), 224, "cls"),
        ("ViT-B-16-SigLIP", (197, 768, 768), 224, "mean"),
        ("ViT-B-16-SigLIP2", (197, 768, 768), 224, "mean"),
        ("ViT-B-16-SigLIP-384", (577, 768, 768), 384, "mean"),
        ("ViT-B-32-SigLIP2-256", (65, 768, 768), 256, "mean"),
        ("ViT-SO400M-14-SigLIP-384", (730, 1152, 1152), 384, "mean"),
        ("EVA02-B-16", (197, 768, 512), 224, "cls"),
        ("EVA02-L-14-336", (577, 1024, 768), 336, "cls"),
        ("PE-Core-B-16", (197, 768, 1024), 224, "cls"),
        ("PE-Core-bigG-14-448", (1025, 1536, 1280), 448, "mean"),
        ("MobileCLIP2-L-14", (257, 1024, 768), 224, "cls"),
        ("vit_medium_patch16_gap_256", (257, 512, 512), 256, "mean"),
        ("ViT-L-14-CLIPA", (257, 1024, 768), 224, "cls"),
        ("coca_ViT-B-32", (50, 768, 512), 224, "cls"),
    ],
)
def test_registry_dims_of_many_families(name: str, dims: tuple[int, ...], frame: int, token: str) -> None:
    backbone = get_backbone(name)
    assert (backbone.token_dims, backbone.frame_size, backbone.global_token) == (dims, frame, token)
    assert get_preset("charades", arch=name).model.token_dims() == dims  # what `r2 train --dry-run` builds


def _accepted_timm_trunks() -> dict[str, registry.Backbone]:
    found = {}
    for name in open_clip.list_models():
        backbone = registry.find_backbone(name)
        if backbone is not None and backbone.timm_model is not None:
            found.setdefault(backbone.timm_model, backbone)
    return found


def test_timm_geometry_read_from_source_equals_timms_own_build() -> None:
    trunks = _accepted_timm_trunks()
    assert {
        "vit_base_patch16_siglip_224",
        "eva02_base_patch16_clip_224",
        "vit_pe_core_base_patch16_224",
    } <= set(trunks)
    for timm_name, backbone in trunks.items():
        with torch.device("meta"):
            trunk = timm.create_model(timm_name)
        rows, cols = trunk.patch_embed.grid_size
        prefix, has_class_token = prefix_tokens(trunk)
        built = (rows * cols + 1, trunk.embed_dim, len(trunk.blocks), trunk.patch_embed.img_size[0])
        read = (backbone.video_tokens, backbone.video_width, backbone.vision_layers, backbone.frame_size)
        assert built == read, timm_name
        assert backbone.global_token == ("cls" if has_class_token else "mean"), timm_name
        assert prefix >= int(has_class_token)


def test_convnext_is_refused_and_unknown_names_get_the_closest() -> None:
    with pytest.raises(ConfigError) as info:
        get_backbone("convnext_base_w")
    message = str(info.value)
    assert "not supported: its image tower is timm's convnext_base (timm/models/convnext.py)" in message
    assert "\n" not in message
    with pytest.raises(
        ConfigError, match=r"unknown backbone 'ViT-B-16-SigLP' \(did you mean ViT-B-16-SigLIP\b"
    ):
        get_backbone("ViT-B-16-SigLP")
    with pytest.raises(ConfigError, match=r"did you mean .*EVA02-B-16"):
        get_backbone("eva02-b-61")


def _cache_json(root: Path, repo: str, filename: str, content: dict) -> None:
    """Put ``content`` as ``filename`` of ``repo`` into a Hugging Face cache at ``root``."""
    folder = root / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / filename).write_text(json.dumps(content))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache the registry reads (its file cache cleared around the test)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    registry._hub_file.cache_clear()
    yield tmp_path
    registry._hub_file.cache_clear()


def test_hf_hub_names_and_hugging_face_text_towers_come_from_the_local_cache(hf_cache) -> None:
    with pytest.raises(ConfigError, match="open_clip_config.json of timm/ViT-B-16-SigLIP is not in the"):
        get_backbone("hf-hub:timm/ViT-B-16-SigLIP")
    assert registry.find_backbone("roberta-ViT-B-32") is None
    config = open_clip.get_model_config("ViT-B-16-SigLIP")
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}
    hub_config = {"model_cfg": config, "preprocess_cfg": preprocess}
    _cache_json(hf_cache, "timm/ViT-B-16-SigLIP", "open_clip_config.json", hub_config)
    _cache_json(hf_cache, "roberta-base", "config.json", {"hidden_size": 640, "num_hidden_layers": 6})
    registry._hub_file.cache_clear()
    hub = get_backbone(" hf-hub:timm/ViT-B-16-SigLIP/ ")
    assert hub.name == hub.model_name == "hf-hub:timm/ViT-B-16-SigLIP"
    assert hub.token_dims == get_backbone("ViT-B-16-SigLIP").token_dims
    assert open_clip_config("hf-hub:timm/ViT-B-16-SigLIP")[2] == preprocess
    roberta = get_backbone("roberta-ViT-B-32")
    assert (roberta.text_width, roberta.text_layers, roberta.hf_text_model) == (640, 6, "roberta-base")


@pytest.fixture(scope="module")
def siglip() -> ClipBackbone:
    return load_backbone("ViT-B-16-SigLIP", "random", layers=LAYERS, device="cpu")


@pytest.fixture(scope="module")
def eva() -> ClipBackbone:
    return load_backbone("EVA02-B-16", "random", layers=LAYERS, device="cpu")


def _images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))


def _no_hooks_left(blocks: list[torch.nn.Module]) -> bool:
    return not any(block._forward_hooks for block in blocks)


@torch.inference_mode()
def test_siglip_frames_are_the_last_blocks_with_the_mean_patch_token_first(siglip) -> None:
    spec = get_backbone("ViT-B-16-SigLIP")
    images = _images(2, spec.frame_size)
    tokens = siglip.encode_frames(images)
    assert tokens.shape == (2, LAYERS, spec.video_tokens, spec.video_width) and tokens.dtype == torch.float32
    trunk = siglip.model.visual.trunk
    x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))  # no class token
    manual = []
    for block in trunk.blocks:
        x = block(x)
        manual.append(x)
    for j, block_out in enumerate(manual[-LAYERS:]):
        torch.testing.assert_close(tokens[:, j, 1:], block_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tokens[:, j, 0], block_out.mean(1), atol=1e-5, rtol=1e-5)
    assert _no_hooks_left(tower_blocks(siglip.model.visual))
    assert siglip.global_token == "mean" and siglip.info().manifest("charades", 0.5).global_token == "mean"


@torch.inference_mode()
def test_eva02_frames_keep_the_class_token_first(eva) -> None:
    spec = get_backbone("EVA02-B-16")
    images = _images(2, spec.frame_size)
    tokens = eva.encode_frames(images)
    assert tokens.shape == (2, LAYERS, spec.video_tokens, spec.video_width)
    out = eva.model.visual.trunk.forward_intermediates(
        images, indices=LAYERS, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )
    for j, (patches, prefix) in enumerate(out):
        torch.testing.assert_close(tokens[:, j, 1:], patches, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tokens[:, j, 0], prefix[:, 0], atol=1e-5, rtol=1e-5)
    assert eva.global_token == "cls"


@torch.inference_mode()
def test_eva02_text_keeps_sot_to_eot_of_its_causal_tower(eva) -> None:
    ids = eva.tokenize(TEXTS)
    tokens = eva.encode_texts(TEXTS)
    assert [t.shape for t in tokens] == [(int((row != 0).sum()), LAYERS, 512) for row in ids]
    text = eva.model.text
    eot = torch.stack([text.ln_final(t[-1, -1]) for t in tokens]) @ text.text_projection
    torch.testing.assert_close(eot, eva.model.encode_text(ids), atol=1e-5, rtol=1e-5)
    assert _no_hooks_left(tower_blocks(text))


@torch.inference_mode()
def test_siglip_text_runs_the_full_padded_context_and_keeps_the_real_tokens(siglip) -> None:
    pad = 1
    ids = torch.full((2, 64), pad)
    ids[0, :3] = torch.tensor([5, 17, 42])
    ids[1, :2] = torch.tensor([7, pad])  # a padding id inside a text is kept: L ends at the last non-pad
    ids[1, 2] = 9
    probe = dataclasses.replace(siglip, tokenizer=lambda texts: ids, pad_id=pad)
    tokens = probe.encode_texts(["x", "y"])
    assert [t.shape for t in tokens] == [(3, LAYERS, 768), (3, LAYERS, 768)]
    text = siglip.model.text
    x = text.token_embedding(ids) + text.positional_embedding
    manual = []
    for block in text.transformer.resblocks:
        x = block(x)  # bidirectional: no mask
        manual.append(x)
    for j, block_out in enumerate(manual[-LAYERS:]):
        for i, t in enumerate(tokens):
            torch.testing.assert_close(t[:, j], block_out[i, :3], atol=1e-5, rtol=1e-5)
    pooled = text.text_projection(text.ln_final(manual[-1][:, -1]))  # SigLIP pools the last (pad) position
    torch.testing.assert_close(pooled, siglip.model.encode_text(ids), atol=1e-5, rtol=1e-5)
    alone = dataclasses.replace(siglip, tokenizer=lambda texts: ids[:1, :3], pad_id=pad).encode_texts(["x"])
    assert not torch.allclose(alone[0], tokens[0])  # the padded context is part of the model's input


def test_a_missing_hugging_face_tokenizer_is_replaced_for_random_weights_only(siglip, monkeypatch) -> None:
    def unavailable(name: str) -> None:
        raise ModuleNotFoundError("No module named 'transformers'")

    monkeypatch.setattr(open_clip, "get_tokenizer", unavailable)
    spec = get_backbone("ViT-B-16-SigLIP")
    tokenizer, pad = backbone_module._load_tokenizer(spec, siglip.model, random_weights=True)
    ids = tokenizer(TEXTS)
    assert pad == 0 and ids.shape == (2, spec.context_length)
    assert int(ids.max()) < siglip.model.text.vocab_size and int((ids[1] != 0).sum()) == 3  # SOT dog EOT
    with pytest.raises(
        WeightsError, match=r"tokenizer of ViT-B-16-SigLIP \(Hugging Face timm/ViT-B-16-SigLIP"
    ):
        backbone_module._load_tokenizer(spec, siglip.model, random_weights=False)


def test_preprocessing_comes_from_the_models_own_config(siglip, eva) -> None:
    for backbone in (siglip, eva):
        tag = open_clip.list_pretrained_tags_by_model(backbone.name)[0]
        cfg = open_clip.get_pretrained_cfg(backbone.name, tag)
        got = backbone.preprocess
        assert (got.size, got.resize_mode) == (224, cfg["resize_mode"])
        assert got.interpolation == cfg["interpolation"]
        assert (got.mean, got.std) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert siglip.preprocess.resize_mode == "squash" and eva.preprocess.mean == OPENAI_MEAN


def test_the_manifest_records_the_global_token_and_preprocessing(tmp_path, siglip) -> None:
    manifest = siglip.info().manifest("charades", 0.5)
    assert manifest.preprocess == siglip.preprocess.record() and manifest.video_tokens == 197
    create_store(tmp_path / "s.zarr", manifest)
    assert open_store(tmp_path / "s.zarr", expect=manifest.identity()).manifest == manifest
    with pytest.raises(StoreError, match="global_token is 'mean' in the store but 'cls' was expected"):
        open_store(tmp_path / "s.zarr", expect={"global_token": "cls"})


@torch.inference_mode()
def test_siglip2_builds_offline_with_the_registry_geometry() -> None:
    spec = get_backbone("ViT-B-16-SigLIP2")
    small = load_backbone("ViT-B-16-SigLIP2", "random", layers=1, device="cpu")
    assert len(tower_blocks(small.model.visual)) == spec.vision_layers
    assert len(tower_blocks(small.model.text)) == spec.text_layers
    tokens = small.encode_frames(_images(1, spec.frame_size))
    assert tokens.shape == (1, 1, spec.video_tokens, spec.video_width)
    torch.testing.assert_close(tokens[:, :, 0], tokens[:, :, 1:].mean(2))
    assert small.encode_texts(["dog"])[0].shape[1:] == (1, spec.text_width)
