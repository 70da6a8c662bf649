"""Unit tests of the R² model blocks, losses, decoding, checkpoints and the Grounder API (CPU, tiny data)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shards.backbones import REFERENCE_BACKBONES, get_backbone
from shards.errors import CheckpointError
from train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from train.config import get_preset
from train.inference import Grounder, TokenShapeError
from train.model import (
    R2Tuning,
    Targets,
    assign_targets,
    count_parameters,
    decode_boundaries,
    decode_saliency,
)
from train.model.losses import SampledNCELoss
from train.model.points import PointGenerator
from train.model.reference import forward_reference

KEYS_FILE = Path(__file__).parent / "data" / "r2_parity" / "state_dict_keys.txt"


def build(preset: str = "qvhighlights", arch: str = "ViT-B-32", seed: int = 0) -> R2Tuning:
    torch.manual_seed(seed)
    cfg = get_preset(preset, arch=arch)
    return R2Tuning(cfg.model, cfg.loss).eval()


def random_batch(
    model: R2Tuning, lengths: list[int], words: list[int], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Clean-path inputs (zero padding + masks) and targets for a batch of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    m = model.cfg
    p, c, cq = m.token_dims()
    frames, tokens = max(lengths), max(words)
    video = torch.randn(len(lengths), frames, m.layers, p, c, generator=gen)
    query = torch.randn(len(lengths), tokens, m.layers, cq, generator=gen)
    video_mask = torch.arange(frames)[None] < torch.tensor(lengths)[:, None]
    query_mask = torch.arange(tokens)[None] < torch.tensor(words)[:, None]
    video, query = video * video_mask[..., None, None, None], query * query_mask[..., None, None]
    saliency = torch.rand(len(lengths), frames, generator=gen) * video_mask
    pos_clip = torch.stack([saliency[i, :n].argmax() for i, n in enumerate(lengths)])
    boundary = torch.tensor([[[0.0, 2.0 * n / 3]] for n in lengths])  # seconds at fps 1
    return {
        "video": video,
        "video_mask": video_mask,
        "query": query,
        "query_mask": query_mask,
        "saliency": saliency,
        "pos_clip": pos_clip,
        "boundary": boundary,
        "fps": torch.ones(len(lengths)),
    }


def reference_keys() -> dict[str, dict[str, tuple[int, ...]]]:
    """name -> shape of the two official configs listed in state_dict_keys.txt (MR first, then HD)."""
    sections: list[dict[str, tuple[int, ...]]] = []
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("# config:"):
            sections.append({})
        elif line and not line.startswith("#"):
            name, shape, _ = line.split("\t")
            sections[-1][name] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    return {"qvhighlights": sections[0], "tvsum_BK": sections[1]}


# --- architecture -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("qvhighlights", 2_836_242),
        ("charades", 2_836_242),
        ("tvsum_BK", 1_846_281),
        ("youtube_dog", 1_846_281),
    ],
)
def test_trainable_parameters_match_reference(preset: str, expected: int) -> None:
    assert count_parameters(build(preset)) == expected


@pytest.mark.parametrize("preset", ["qvhighlights", "tvsum_BK"])
def test_state_dict_names_and_shapes_match_official_listing(preset: str) -> None:
    ours = {k: tuple(v.shape) for k, v in build(preset).state_dict().items()}
    assert ours == reference_keys()[preset]


def test_initialisation_follows_reference() -> None:
    model = build()
    adapter = model.adapter
    assert torch.equal(adapter.gate, torch.zeros(3)) and torch.equal(adapter.scale, torch.zeros(4))
    assert torch.equal(model.coef, torch.ones(4))
    assert model.loss._loss_sal.scale.item() == pytest.approx(math.log(1 / 0.07))
    bound = math.sqrt(6 / (256 + 256))  # xavier-uniform, gain 1
    for att in (adapter.tem.cross_att, adapter.tem.self_att):
        for layer in (att.q, att.k, att.v, att.m):
            assert layer.weight.abs().max() <= bound and torch.all(layer.bias == 0)
            assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    for layer in (adapter.tem.ffn.mapping[0], adapter.tem.ffn.mapping[2]):
        assert torch.all(layer.bias == 0)
        fan_out = layer.weight.size(0)
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)


@pytest.mark.parametrize("arch", REFERENCE_BACKBONES)
def test_every_backbone_builds_and_runs(arch: str) -> None:
    model = build(arch=arch)
    dims = get_backbone(arch)
    assert model.adapter.video_map[2].in_features == dims.video_width + 2
    assert model.adapter.query_map[2].in_features == dims.text_width
    b = random_batch(model, [3], [2])
    with torch.no_grad():
        out = model(b["video"], b["video_mask"], b["query"], b["query_mask"])
    assert out.level_sizes == [3, 1]  # strides 4 and 8 skipped: T < stride
    assert out.class_logits.shape == (1, 4) and out.coord.shape == (1, 4, 2)
    assert out.points[:, 0].tolist() == [0, 1, 2, 0] and out.points[:, 3].tolist() == [1, 1, 1, 2]
    assert out.video_emb.shape == (1, 3, 256) and out.coll_v.shape == (4, 1, 3, 256)


def test_official_dict_path_equals_clean_path_and_keeps_inputs() -> None:
    model = build()
    b = random_batch(model, [5, 3], [4, 2])
    batch, frames, tokens = 2, 5, 4
    video = b["video"].reshape(batch, frames, -1).masked_fill(~b["video_mask"][..., None], float("inf"))
    query = b["query"].reshape(batch, tokens, -1).masked_fill(~b["query_mask"][..., None], float("inf"))
    boundary = torch.cat((b["boundary"], torch.full((2, 1, 2), float("inf"))), dim=1)
    data = {
        "video": video,
        "query": query,
        "fps": [1.0, 1.0],
        "boundary": boundary,
        "saliency": b["saliency"],
        "pos_clip": b["pos_clip"][:, None],
    }
    copies = {k: v.clone() for k, v in data.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        official = forward_reference(model, data, "train")
        targets = Targets(b["saliency"], b["pos_clip"], b["fps"], b["boundary"])
        clean = model(b["video"], b["video_mask"], b["query"], b["query_mask"], targets=targets).losses
    assert set(official) == {"loss_cls", "loss_reg", "loss_sal", "loss_video_cal", "loss_layer_cal"}
    for key, value in clean.items():
        assert official[key].item() == pytest.approx(value.item(), rel=1e-6)
    for key, value in copies.items():
        assert torch.equal(data[key], value)
    with pytest.raises(ValueError, match="one sample"):
        forward_reference(model, data, "val")


def test_dropout_and_droppath_only_in_training_mode() -> None:
    model = build()
    b = random_batch(model, [4], [3])
    args = (b["video"], b["video_mask"], b["query"], b["query_mask"])
    with torch.no_grad():
        first, second = model(*args).class_logits, model(*args).class_logits
        assert torch.equal(first, second)
        model.train()
        assert not torch.equal(model(*args).class_logits, first)


# --- targets, losses, decoding -----------------------------------------------------------------------------


def test_assign_targets_hand_example() -> None:
    points = PointGenerator((1, 2))([8, 4])  # level 0: t = 0..7, range (0, 2); level 1: t = 0,2,4,6, (2, inf)
    boundary = torch.tensor([[[2.0, 5.0], [3.0, 4.0]]])  # clips at fps 1; second window is shorter
    cls_tgt, reg_tgt = assign_targets(points, boundary, torch.ones(1), sample_radius=1.5)
    # level 0: t=3 -> window 2 (max dist 1, shorter), t=4 -> window 2 (max(1, 0) = 1 <= 2)
    # level 1 (s=2): t=2 -> window 1 (max(0, 3) = 3 in [2, inf]), t=4 -> window 1 (max(2, 1) = 2)
    assert cls_tgt[0].nonzero().flatten().tolist() == [3, 4, 9, 10]
    assert reg_tgt[0, 3].tolist() == [0.0, 1.0] and reg_tgt[0, 4].tolist() == [1.0, 0.0]
    assert reg_tgt[0, 9].tolist() == [0.0, 1.5] and reg_tgt[0, 10].tolist() == [1.0, 0.5]


def test_sampled_nce_fully_masked_step_gives_reference_value_with_finite_gradients() -> None:
    torch.manual_seed(0)
    video = torch.randn(2, 6, 8, requires_grad=True)
    query = torch.randn(2, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    saliency = torch.tensor([[0.2, 0.9, 0.1, 0.3, 0.0, 0.0], [0.5, 0.1, 0.2, 0.3, 0.9, 0.4]])
    pos = torch.tensor([1, 3])  # sample 1: steps 0, 4, 5 are more salient than its positive
    # steps 4 and 5 are padding in sample 0 and excluded in sample 1: masked for the whole batch
    loss = SampledNCELoss(weight=0.1)(video, query, mask, saliency, pos)

    scale = 1 / 0.07
    sim = F.cosine_similarity(video, query[:, None], dim=-1) * scale
    valid = (saliency <= saliency[[0, 1], pos][:, None]) & mask
    expected = 0.0
    for b in range(2):
        row = sim[b][valid[b]]
        col = sim[:, pos[b]][valid[:, pos[b]]]
        expected += (torch.logsumexp(row, 0) - sim[b, pos[b]]) / 2 + (
            torch.logsumexp(col, 0) - sim[b, pos[b]]
        ) / 2
    assert loss.item() == pytest.approx(0.1 * expected.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(video.grad).all() and torch.isfinite(query.grad).all()
    assert video.grad.abs().sum() > 0

    # the reference (additive -inf mask, column softmax over every time step) has NaN gradients here
    video.grad = None
    full = sim + torch.where(valid, 0.0, float("-inf"))
    reference = -full.t().log_softmax(dim=1)[pos, torch.arange(2)].mean()
    assert torch.isfinite(reference)
    reference.backward()
    assert torch.isnan(video.grad).any()


def test_decode_boundaries_hand_example() -> None:
    points = torch.tensor([[0.0, 0, 2, 1], [3.0, 0, 2, 1], [4.0, 2, 4, 2]])
    coord = torch.tensor([[1.0, 2.0], [0.5, 0.5], [1.0, 1.5]])
    logits = torch.tensor([0.0, 2.0, -1.0])
    windows = decode_boundaries(logits, coord, points, fps=0.5, top_k=2)
    expected = torch.tensor(
        [[(3 - 0.5) / 0.5, (3 + 0.5) / 0.5, torch.sigmoid(torch.tensor(2.0)).item()], [-2.0, 4.0, 0.5]]
    )
    assert torch.allclose(windows, expected)


def test_decode_saliency_repeats_levels_and_pads_with_last_value() -> None:
    logits = torch.logit(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.35, 0.15]))  # levels of 5 and 2 steps
    saliency = decode_saliency(logits, [5, 2], length=5)
    assert torch.allclose(saliency, torch.tensor([0.35, 0.35, 0.3, 0.4, 0.5]))
    video, query = torch.tensor([[1.0, 0.0]] * 5), torch.tensor([1.0, 1.0])
    merged = decode_saliency(logits, [5, 2], 5, video, query)
    assert torch.allclose(merged, saliency / math.sqrt(2))


# --- checkpoints --------------------------------------------------------------------------------

_TRIPPED: list[str] = []


def _trip() -> None:
    _TRIPPED.append("executed")


class _Tripwire:
    """Unpickling this object calls :func:`_trip`; a safe loader must never do that."""

    def __reduce__(self):  # noqa: ANN204
        return (_trip, ())


def test_checkpoint_roundtrip_is_weights_only_and_atomic(tmp_path: Path) -> None:
    cfg = get_preset("tvsum_BK")
    torch.manual_seed(1)
    model = R2Tuning(cfg.model, cfg.loss)
    meta = {
        "epoch": 7,
        "metrics": {"mAP": np.float64(88.5)},
        "store": tmp_path / "s.zarr",
        "curve": np.ones(3),
    }
    path = save_checkpoint(tmp_path / "ckpt" / "best.pt", model, cfg, meta)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format_version", "state_dict", "config", "meta"}
    loaded, loaded_cfg, ckpt = load_checkpoint(path)
    assert loaded_cfg.to_dict() == cfg.to_dict()
    assert (
        ckpt.meta["epoch"] == 7
        and ckpt.meta["metrics"]["mAP"] == 88.5
        and ckpt.meta["store"] == str(tmp_path / "s.zarr")
    )
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    with pytest.raises(TypeError, match="meta.bad"):
        save_checkpoint(tmp_path / "other.pt", model, cfg, {"bad": object()})
    assert not (tmp_path / "other.pt").exists()


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    cfg = get_preset("tvsum_BK")
    good = save_checkpoint(tmp_path / "hd.pt", R2Tuning(cfg.model, cfg.loss), cfg)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(truncated)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        read_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "weights": [1, 2]}, other)
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        read_checkpoint(other)
    with pytest.raises(
        CheckpointError,
        match=r"missing: pyramid.\* \(24\), coord_head.\* \(4\); shape .*: coef \(1,\) vs \(4,\)",
    ):
        load_checkpoint(good, cfg=get_preset("qvhighlights"))


def test_official_checkpoint_with_unsafe_meta_loads_state_dict_only(tmp_path: Path) -> None:
    cfg = get_preset("qvhighlights")
    model = R2Tuning(cfg.model, cfg.loss)
    path = tmp_path / "official.pth"
    meta = {"epoch": 30, "hook": _Tripwire(), "score": np.float64(47.86)}
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    with pytest.raises(Exception):  # noqa: B017 - torch's own error type varies across versions
        torch.load(path, weights_only=True)
    ckpt = read_checkpoint(path)
    assert _TRIPPED == []
    assert ckpt.meta == {} and ckpt.config is None and any("_trip" in name for name in ckpt.dropped_meta)
    with pytest.raises(CheckpointError, match="no config"):
        load_checkpoint(path)
    loaded, _, _ = load_checkpoint(path, cfg=cfg)
    assert torch.equal(loaded.adapter.video_map[2].weight, model.adapter.video_map[2].weight)


# --- Grounder API -------------------------------------------------------------------------------


def test_grounder_predicts_raw_outputs_from_our_checkpoint(tmp_path: Path) -> None:
    cfg = get_preset("tvsum_BK")
    torch.manual_seed(2)
    model = R2Tuning(cfg.model, cfg.loss).eval()
    path = save_checkpoint(tmp_path / "hd.pt", model, cfg)
    grounder = Grounder.from_checkpoint(path)
    b = random_batch(model, [6], [3])
    pred = grounder.predict(b["video"][0].half().numpy(), b["query"][0].half(), fps=0.5)
    assert pred.moments.shape == (0, 3) and pred.saliency.shape == (6,)
    with torch.no_grad():
        logits = model(
            b["video"].half().float(), b["video_mask"], b["query"].half().float(), b["query_mask"]
        ).class_logits
    np.testing.assert_allclose(pred.saliency, torch.sigmoid(logits[0]).numpy(), rtol=1e-6)


def test_grounder_rejects_tokens_of_another_backbone() -> None:
    cfg = get_preset("qvhighlights")
    grounder = Grounder(R2Tuning(cfg.model, cfg.loss), cfg)
    query = np.zeros((3, 4, 512), np.float32)
    with pytest.raises(TokenShapeError, match=r"\(T, >=4, 50, 768\)"):
        grounder.predict(np.zeros((5, 4, 197, 768), np.float32), query, fps=0.5)
    with pytest.raises(TokenShapeError, match="k >= 4"):
        grounder.predict(np.zeros((5, 2, 50, 768), np.float32), query, fps=0.5)
    with pytest.raises(TokenShapeError, match="query tokens"):
        grounder.predict(np.zeros((5, 4, 50, 768), np.float32), np.zeros((3, 4, 768), np.float32), fps=0.5)
