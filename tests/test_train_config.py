"""Run configs: backbone dims, per-dataset presets (reference values), overrides, JSON, dry-run CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from r2.cli import build_app
from shards.datasets import get_dataset
from shards.errors import ConfigError
from train.config import (
    RunConfig,
    TokenDims,
    apply_overrides,
    get_preset,
    preset_names,
)

YOUTUBE = ["dog", "gymnastics", "parkour", "skating", "skiing", "surfing"]
TVSUM = ["BK", "BT", "DS", "FM", "GA", "MS", "PK", "PR", "VT", "VU"]


def test_arch_is_normalized_and_its_dims_come_from_the_registry() -> None:
    cfg = get_preset("charades", arch="ViT-L/14@336px")
    assert cfg.model.arch == "ViT-L-14-336" and cfg.model.token_dims() == (577, 1024, 768)
    assert (cfg.model.video_tokens, cfg.model.video_width, cfg.model.text_width) == (None, None, None)
    assert get_preset("charades", arch="vit-b-32-quickgelu").model.arch == "ViT-B-32"
    assert get_preset("charades", arch="ViT-H/14").model.token_dims() == (257, 1280, 1024)


def test_token_dims_are_config_fields_saved_in_json() -> None:
    cfg = apply_overrides(get_preset("tacos", arch="my/vit"), ["model.layers=2"])
    assert cfg.model.arch == "my-vit" and cfg.model.known_token_dims() == (None, None, None)
    with pytest.raises(ConfigError, match=r"unknown backbone 'my-vit'.*model.video_tokens=P.*on a store"):
        cfg.model.token_dims()
    with pytest.raises(ConfigError, match="did you mean ViT-B-32"):
        get_preset("tacos", arch="ViT-B-23").model.token_dims()
    with pytest.raises(ConfigError, match="'convnext_base_w' is not supported: .*not a plain ViT"):
        get_preset("tacos", arch="convnext_base_w").model.token_dims()
    assert get_preset("tacos", arch="ViT-B-16-SigLIP").model.token_dims() == TokenDims(197, 768, 768)
    apply_overrides(cfg, ["model.video_tokens=257", "model.video_width=1280", "model.text_width=1024"])
    assert cfg.model.token_dims() == TokenDims(257, 1280, 1024)
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert saved["model"]["video_width"] == 1280
    assert RunConfig.from_dict(saved).model.token_dims() == (257, 1280, 1024)
    partial = apply_overrides(get_preset("tacos"), ["model.video_tokens=197"])  # ViT-B-32 at 448 px
    assert partial.model.token_dims() == (197, 768, 512)
    with pytest.raises(ConfigError, match="model.video_tokens, model.video_width and model.text_width"):
        apply_overrides(get_preset("tacos"), ["model.text_width=0"])


def test_dry_run_of_an_unknown_backbone_needs_its_dims() -> None:
    runner = CliRunner()
    result = runner.invoke(build_app(), ["train", "--dry-run", "--preset", "tacos", "--arch", "my-vit"])
    assert isinstance(result.exception, ConfigError) and "model.video_width=C" in str(result.exception)
    dims = ["model.video_tokens=257", "model.video_width=1280", "model.text_width=1024"]
    sets = [a for item in dims for a in ("--set", item)]
    result = runner.invoke(
        build_app(), ["train", "--dry-run", "--preset", "tacos", "--arch", "my-vit", *sets]
    )
    assert result.exit_code == 0, result.output
    assert "video tokens (T, 4, 257, 1280), query tokens (L, 4, 1024)" in result.output


def test_preset_names() -> None:
    names = preset_names()
    assert names[:5] == ["qvhighlights", "ego4d", "charades", "tacos", "custom"]
    assert names[5:] == [f"youtube_{d}" for d in YOUTUBE] + [f"tvsum_{d}" for d in TVSUM]


@pytest.mark.parametrize(
    ("name", "dropout", "sal", "epochs", "lr", "steps", "batch", "repeat", "nms", "unit", "key"),
    [
        ("qvhighlights", 0.5, 0.1, 30, 5e-4, (20,), 128, 4, "normal", 2.0, "MR-full-mAP"),
        ("ego4d", 0.3, 0.1, 30, 2.5e-4, (20,), 32, 1, "linear", None, "MR-full-R1@0.5"),
        ("charades", 0.35, 0.01, 50, 2.5e-4, (30,), 32, 1, "linear", 0.1, "MR-full-R1@0.5"),
        ("tacos", 0.5, 0.05, 100, 2.5e-4, (50,), 32, 1, "linear", None, "MR-full-R1@0.5"),
    ],
)
def test_moment_retrieval_presets(
    name: str, dropout: float, sal: float, epochs: int, lr: float, steps: tuple, batch: int, repeat: int,
    nms: str, unit: float | None, key: str,
) -> None:  # fmt: skip
    cfg = get_preset(name)
    assert cfg.dataset == name and cfg.domain is None
    assert cfg.model.strides == (1, 2, 4, 8) and cfg.model.use_tef and cfg.model.coord_head
    assert cfg.model.dropout == dropout and cfg.loss.sal_weight == sal and cfg.loss.cls_loss == "focal"
    assert (cfg.train.epochs, cfg.optim.lr, cfg.optim.lr_steps, cfg.train.batch_size) == (
        epochs,
        lr,
        steps,
        batch,
    )
    assert cfg.train.repeat == repeat and cfg.optim.warmup_iters == 500
    assert (cfg.optim.weight_decay, cfg.optim.grad_clip) == (1e-4, 35.0)
    spec = get_dataset(cfg.dataset)  # the one source of the evaluation settings
    assert (spec.nms_mode, spec.clip_unit, spec.key_metric) == (nms, unit, key)


@pytest.mark.parametrize(
    ("name", "dataset", "domain", "epochs"),
    [("youtube_dog", "youtube", "dog", 200), ("tvsum_bk", "tvsum", "BK", 500)],
)
def test_highlight_presets(name: str, dataset: str, domain: str, epochs: int) -> None:
    cfg = get_preset(name)
    assert (cfg.preset, cfg.dataset, cfg.domain) == (f"{dataset}_{domain}", dataset, domain)
    m = cfg.model
    assert (m.strides, m.use_tef, m.merge_cls_sal, m.coord_head) == ((1,), False, False, False)
    assert cfg.loss.cls_loss == "dynamic_bce" and cfg.loss.sal_direction == ("row",)
    assert (cfg.train.epochs, cfg.optim.lr, cfg.optim.lr_steps, cfg.optim.warmup_iters) == (
        epochs,
        5e-4,
        (),
        50,
    )
    spec = get_dataset(cfg.dataset)
    assert cfg.train.batch_size == 4 and spec.key_metric == "mAP" and spec.nms_mode is None


def test_every_preset_pools_8_videos_and_splits_are_settable() -> None:
    for name in preset_names():
        train = get_preset(name).train
        # TACoS validates on `test` as the reference does; the others choose val, else test (Charades-STA)
        val_split = "test" if name == "tacos" else None
        assert (train.pool_size, train.train_split, train.val_split) == (8, "train", val_split), name
    cfg = apply_overrides(get_preset("tacos"), ["train.val_split=val", "train.pool_size=32"])
    back = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert (back.train.val_split, back.train.pool_size) == ("val", 32)
    assert apply_overrides(back, ["train.val_split=none"]).train.val_split is None
    with pytest.raises(ConfigError, match="train.train_split must be a split name"):
        apply_overrides(get_preset("tacos"), ["train.train_split="])


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"did you mean charades.*valid presets: qvhighlights, .*tvsum_VU"):
        get_preset("charade")


def test_overrides_dotted_and_aliases_with_types() -> None:
    cfg = apply_overrides(
        get_preset("tacos"),
        [
            "model.dropout=0.3",
            "lr=1e-4",
            "batch_size=16",
            "loss_sal=0.2",
            "epochs=3",
            "model.strides=1,2",
            "optim.lr_steps=[]",
            "train.amp=false",
            "optim.grad_clip=none",
            "loss.sal_direction=(row)",
        ],
    )
    assert cfg.model.dropout == 0.3 and cfg.optim.lr == 1e-4 and cfg.train.batch_size == 16
    assert cfg.loss.sal_weight == 0.2 and cfg.train.epochs == 3 and cfg.model.strides == (1, 2)
    assert cfg.optim.lr_steps == () and cfg.train.amp is False and cfg.optim.grad_clip is None
    assert cfg.loss.sal_direction == ("row",)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("model.dropuot=0.1", r"unknown config key 'model.dropuot'; did you mean model.dropout"),
        ("learning_rate=1", r"unknown config key 'learning_rate'"),
        ("model=1", r"unknown config key 'model'"),
        ("lr=fast", r"bad value 'fast' for lr: expected float"),
        ("epochs=2.5", r"bad value '2.5' for epochs: expected int"),
        ("train.amp=maybe", r"expected bool"),
        ("lr", r"malformed override 'lr'"),
        ("model.strides=2,4", r"model.strides must start with 1"),
        ("model.strides=1,3", r"powers of two"),
        ("loss.cls_loss=mse", r"loss.cls_loss must be"),
    ],
)
def test_bad_overrides(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("qvhighlights"), [item])


def test_json_round_trip() -> None:
    cfg = apply_overrides(get_preset("youtube_skiing", arch="ViT-B-16"), ["seed=7", "optim.grad_clip=none"])
    text = json.dumps(cfg.to_dict())
    back = RunConfig.from_dict(json.loads(text))
    assert back == cfg
    with pytest.raises(ConfigError, match="unknown config key 'model.depth'"):
        RunConfig.from_dict({"model": {"depth": 3}})


def test_configs_of_earlier_versions_with_an_eval_section_load() -> None:
    saved = get_preset("charades").to_dict()
    saved["eval"] = {"nms_mode": "linear", "nms_thres": None,
                     "clip_unit": 0.1, "key_metric": "MR-full-R1@0.5"}
    assert RunConfig.from_dict(saved) == get_preset("charades")
    with pytest.raises(ConfigError, match="unknown config key 'eval.clip_unit'"):
        apply_overrides(get_preset("tacos"), ["eval.clip_unit=0.5"])


def test_cli_dry_run_prints_summary_and_trainable_count() -> None:
    runner = CliRunner()
    result = runner.invoke(build_app(), ["train", "--dry-run", "--preset", "qvhighlights"])
    assert result.exit_code == 0, result.output
    assert "trainable parameters: " in result.output
    assert "adapter" in result.output and "coord_head" in result.output and "198,402" in result.output
    result = runner.invoke(
        build_app(), ["train", "--dry-run", "--preset", "tvsum_BK", "--set", "model.dropout=0.2"]
    )
    assert result.exit_code == 0 and "trainable parameters: " in result.output
    assert "coord_head" not in result.output


def test_r2_train_command_and_its_errors() -> None:
    root = build_app()
    runner = CliRunner()
    result = runner.invoke(
        root, ["train", "--dry-run", "--preset", "charades", "--arch", "ViT-L-14", "--set", "lr=1e-4"]
    )
    assert result.exit_code == 0, result.output
    assert "video tokens (T, 4, 257, 1024)" in result.output and "lr 0.0001" in result.output
    result = runner.invoke(root, ["train", "--dry-run", "--preset", "nope"])
    assert isinstance(result.exception, ConfigError)
    result = runner.invoke(root, ["train", "--preset", "charades"])
    assert isinstance(result.exception, ConfigError) and "--store" in str(result.exception)
