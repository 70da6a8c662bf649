"""Backbone registry (shards/backbones.py): geometry read from open_clip's configs, one name normalizer.

Families beyond open_clip's own ViT (timm trunks, hf-hub names, built towers) are in
tests/test_backbone_families.py."""

from __future__ import annotations

import subprocess
import sys

import open_clip
import pytest

from shards.backbones import find_backbone, get_backbone, normalize_backbone
from shards.errors import ConfigError


def _open_clip_geometry(config_name: str) -> tuple[int, int, int, int, int, int]:
    """(frame, patch, C, Cq, vision layers, text layers) as open_clip's own config gives them."""
    config = open_clip.get_model_config(config_name)
    vision, text = config["vision_cfg"], config["text_cfg"]
    return (
        vision["image_size"],
        vision["patch_size"],
        vision["width"],
        text["width"],
        vision["layers"],
        text["layers"],
    )


@pytest.mark.parametrize(
    ("name", "config_name", "dims"),
    [
        ("ViT-B-32", "ViT-B-32-quickgelu", (50, 768, 512)),
        ("ViT-B-16", "ViT-B-16-quickgelu", (197, 768, 512)),
        ("ViT-L-14", "ViT-L-14-quickgelu", (257, 1024, 768)),
        ("ViT-L-14-336", "ViT-L-14-336-quickgelu", (577, 1024, 768)),
        ("ViT-H-14", "ViT-H-14", (257, 1280, 1024)),
        ("ViT-B-32-256", "ViT-B-32-256", (65, 768, 512)),
    ],
)
def test_geometry_is_open_clips_own(name: str, config_name: str, dims: tuple[int, int, int]) -> None:
    backbone = get_backbone(name)
    assert (backbone.name, backbone.model_name) == (name, config_name)
    geometry = (
        backbone.frame_size,
        backbone.patch_size,
        backbone.video_width,
        backbone.text_width,
        backbone.vision_layers,
        backbone.text_layers,
    )
    assert geometry == _open_clip_geometry(config_name)
    assert backbone.token_dims == dims
    assert backbone.video_tokens == (backbone.frame_size // backbone.patch_size) ** 2 + 1


def test_gelu_and_quickgelu_configs_share_the_reference_geometry() -> None:
    assert _open_clip_geometry("ViT-B-16") == _open_clip_geometry("ViT-B-16-quickgelu")
    assert get_backbone("ViT-B-16").model_name == "ViT-B-16-quickgelu"  # OpenAI's weights need QuickGELU


def test_every_open_clip_config_is_described_or_refused_clearly() -> None:
    described = set()
    for name in open_clip.list_models():
        try:
            backbone = get_backbone(name)
        except ConfigError as err:
            assert f"backbone '{name}' is not supported: " in str(err) and "\n" not in str(err), name
            continue
        described.add(backbone.model_name)
        vision = open_clip.get_model_config(backbone.model_name)["vision_cfg"]
        if backbone.timm_model is None:  # timm trunks: checked against timm builds in test_backbone_families
            assert backbone.video_width == vision["width"]
        else:
            assert backbone.timm_model == vision["timm_model_name"]
        assert normalize_backbone(backbone.name) == backbone.name
    assert {"ViT-B-32-quickgelu", "ViT-L-14-336-quickgelu", "ViT-H-14", "ViT-bigG-14"} <= described
    assert {
        "ViT-B-16-SigLIP",
        "ViT-B-16-SigLIP2",
        "EVA02-B-16",
        "ViT-L-14-CLIPA",
        "PE-Core-B-16",
    } <= described


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("ViT-B/32", "ViT-B-32"),
        ("vit-b-32", "ViT-B-32"),
        ("ViT-B-32-quickgelu", "ViT-B-32"),
        ("ViT-B/16", "ViT-B-16"),
        ("ViT-L/14", "ViT-L-14"),
        ("ViT-L/14@336px", "ViT-L-14-336"),
        ("ViT-L-14-336px", "ViT-L-14-336"),
        (" vit-l-14-336-QuickGELU ", "ViT-L-14-336"),
        ("vit-h/14", "ViT-H-14"),
        ("ViT-H-14-quickgelu", "ViT-H-14-quickgelu"),
        ("vit-bigg-14", "ViT-bigG-14"),
    ],
)
def test_every_spelling_normalizes(spelling: str, canonical: str) -> None:
    assert normalize_backbone(spelling) == canonical
    backbone = find_backbone(spelling)
    assert backbone is not None and backbone.name == canonical


def test_unknown_names_are_kept_and_refused_by_get() -> None:
    assert normalize_backbone("synthetic-rss") == "synthetic-rss"
    assert normalize_backbone("my/vit-quickgelu") == "my-vit"
    assert find_backbone("synthetic-rss") is None
    with pytest.raises(ConfigError, match=r"unknown backbone 'synthetic-rss'.*ViT-L/14@336px"):
        get_backbone("synthetic-rss")
    with pytest.raises(ConfigError, match=r"did you mean ViT-B-32"):
        get_backbone("ViT-B-23")
    for empty in ("", "  "):
        with pytest.raises(ConfigError, match="backbone name is empty"):
            normalize_backbone(empty)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("RN50", "its image tower is a ResNet, not a ViT"),
        ("convnext_base", "image tower is timm's convnext_base (timm/models/convnext.py), not a plain ViT"),
        ("ViTamin-B", "timm's vitamin_base_224 (timm/models/vitamin.py), not a plain ViT"),
        ("MobileCLIP-B", "timm's vit_base_mci_224 (timm/models/vision_transformer_hybrid.py)"),
        ("swin_base_patch4_window7_224", "(timm/models/swin_transformer.py), not a plain ViT"),
    ],
)
def test_non_vit_image_towers_are_refused(name: str, reason: str) -> None:
    assert find_backbone(name) is None
    with pytest.raises(ConfigError, match=f"backbone '{name}' is not supported: ") as info:
        get_backbone(name)
    assert reason in str(info.value) and "e.g. ViT-B-16, ViT-B-16-SigLIP or EVA02-B-16" in str(info.value)


def test_registry_needs_neither_torch_nor_open_clip_imported() -> None:
    code = (
        "import sys, shards.backbones, shards.device; "
        "assert shards.backbones.get_backbone('ViT-B/32').video_tokens == 50; "
        "assert shards.backbones.get_backbone('ViT-B-16-SigLIP-384').video_tokens == 577; "
        "assert shards.backbones.get_backbone('EVA02-L-14-336').video_tokens == 577; "
        "assert not {'torch', 'open_clip', 'timm'} & set(sys.modules), 'imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
