"""Parity of the R² model with the official implementation, on the fixture produced by the reference code.

The fixture directory is ``$R2_PARITY_FIXTURE`` (default ``tests/data/r2_parity``; see its README for
how it was made). Everything runs in eval mode (no dropout / drop-path), as the reference runs did.
Tolerances from the fixture README: boundaries atol 1e-4 s, losses 1e-5 relative, other tensors
rtol 1e-4 (relative to each tensor's largest magnitude, so near-zero entries do not dominate).
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from train.config import get_preset
from train.inference import Grounder
from train.model import R2Tuning, Targets, assign_targets
from train.model.reference import forward_reference

FIXTURE = Path(os.environ.get("R2_PARITY_FIXTURE", Path(__file__).parent / "data" / "r2_parity"))
CONFIGS = {"mr": ("qvhighlights", "state_dict.pt", ""), "hd": ("tvsum_BK", "state_dict_hd.pt", "hd_")}
RTOL = 1e-4
LOSS_RTOL = 1e-5


@cache
def fixture() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    inputs = dict(np.load(FIXTURE / "inputs.npz"))
    outputs = dict(np.load(FIXTURE / "outputs.npz"))
    losses = json.loads((FIXTURE / "losses.json").read_text())
    return inputs, outputs, losses


@cache
def model(kind: str) -> R2Tuning:
    preset, weights, _ = CONFIGS[kind]
    cfg = get_preset(preset)
    net = R2Tuning(cfg.model, cfg.loss)
    net.load_state_dict(torch.load(FIXTURE / weights, weights_only=True), strict=True)
    return net.eval()


def tokens(sample: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``A``/``B`` as (T, 4, 50, 768) video and (L, 4, 512) query tokens (real values)."""
    inputs, _, _ = fixture()
    video = inputs[f"video_{sample}_codes"].astype(np.float32) * inputs["video_scale"]
    return torch.from_numpy(video), torch.from_numpy(inputs[f"query_{sample}"])


def official_batch(kind: str, samples: str) -> dict:
    """The reference's collated batch of ``samples`` (e.g. ``"AB"``): +inf padding, flattened tokens."""
    inputs, _, _ = fixture()
    prefix = CONFIGS[kind][2]
    pairs = [tokens(s) for s in samples]
    frames, words = max(v.size(0) for v, _ in pairs), max(q.size(0) for _, q in pairs)
    rows = max(len(inputs[f"boundary_{s}"]) for s in samples)
    video = torch.full((len(samples), frames, pairs[0][0][0].numel()), float("inf"))
    query = torch.full((len(samples), words, pairs[0][1][0].numel()), float("inf"))
    boundary = torch.full((len(samples), rows, 2), float("inf"))
    saliency = torch.zeros(len(samples), frames)
    for i, (s, (v, q)) in enumerate(zip(samples, pairs, strict=True)):
        video[i, : v.size(0)] = v.flatten(1)
        query[i, : q.size(0)] = q.flatten(1)
        boundary[i, : len(inputs[f"boundary_{s}"])] = torch.from_numpy(inputs[f"boundary_{s}"])
        saliency[i, : v.size(0)] = torch.from_numpy(inputs[f"{prefix}saliency_{s}"])
    pos_clip = torch.tensor([[int(inputs[f"{prefix}pos_clip_{s}"])] for s in samples])
    fps = [float(inputs["fps"])] * len(samples)
    return {
        "video": video,
        "query": query,
        "fps": fps,
        "boundary": boundary,
        "saliency": saliency,
        "pos_clip": pos_clip,
    }


def assert_close(got: torch.Tensor | np.ndarray, ref: np.ndarray, rtol: float = RTOL, name: str = "") -> None:
    got = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=name)
    scale = float(np.abs(ref[finite]).max()) if finite.any() else 1.0
    np.testing.assert_allclose(got[finite], ref[finite], rtol=rtol, atol=rtol * scale, err_msg=name)
    np.testing.assert_array_equal(got[~finite], ref[~finite], err_msg=name)


def assert_losses(got: dict[str, torch.Tensor], ref: dict[str, float]) -> None:
    assert sorted(got) == sorted(k for k in ref if k != "loss")
    for key, value in ref.items():
        actual = sum(v.item() for v in got.values()) if key == "loss" else got[key].item()
        assert actual == pytest.approx(value, rel=LOSS_RTOL, abs=1e-7), key


@pytest.mark.parametrize("kind", ["mr", "hd"])
def test_fixture_state_dict_loads_strict(kind: str) -> None:
    state = torch.load(FIXTURE / CONFIGS[kind][1], weights_only=True)
    net = model(kind)
    ours = net.state_dict()
    assert sorted(ours) == sorted(state)
    assert all(ours[k].shape == state[k].shape for k in state)
    assert torch.equal(net.loss._loss_sal.scale, state["loss._loss_sal.scale"])


@pytest.mark.parametrize("kind", ["mr", "hd"])
@pytest.mark.parametrize("sample", ["A", "B"])
def test_single_sample_intermediates(kind: str, sample: str) -> None:
    _, ref, _ = fixture()
    prefix = f"{CONFIGS[kind][2]}{sample}_"
    video, query = tokens(sample)
    with torch.no_grad():
        out = model(kind)(
            video[None],
            torch.ones(1, video.size(0), dtype=torch.bool),
            query[None],
            torch.ones(1, query.size(0), dtype=torch.bool),
        )
    got = {
        "adapter_video": out.adapter_video[0],
        "video_emb": out.video_emb[0],
        "query_tokens": out.query_tokens[0],
        "query_emb": out.query_emb[0],
        "coll_v": out.coll_v[:, 0],
        "coll_q": out.coll_q[:, 0],
        "class_logits": out.class_logits[0],
    }
    if kind == "mr":
        got |= {"coord_raw": out.coord_raw[0], "coord": out.coord[0], "points": out.points}
    for name, tensor in got.items():
        assert_close(tensor, ref[prefix + name], name=name)
    assert out.level_sizes == ref[prefix + "pyramid_sizes"].tolist()
    assert {k.removeprefix(prefix) for k in ref if k.startswith(prefix)} - set(got) <= {
        "pyramid_sizes",
        "boundary",
        "saliency",
        "pred_nms_normal",
        "pred_nms_linear",
    }


@pytest.mark.parametrize("kind", ["mr", "hd"])
@pytest.mark.parametrize("sample", ["A", "B"])
def test_official_calling_convention_val_mode(kind: str, sample: str) -> None:
    _, ref, losses = fixture()
    prefix = CONFIGS[kind][2]
    batch = official_batch(kind, sample)
    before = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        val = forward_reference(model(kind), batch, "val")
    for key, value in before.items():
        assert torch.equal(batch[key], value), f"caller's {key} was modified"
    assert_close(val["_out"]["saliency"], ref[f"{prefix}{sample}_saliency"], name="saliency")
    if kind == "mr":
        np.testing.assert_allclose(
            val["_out"]["boundary"].numpy(), ref[f"{sample}_boundary"], rtol=0, atol=1e-4
        )
    else:
        assert "boundary" not in val["_out"]
    assert_losses({k: v for k, v in val.items() if k != "_out"}, losses[f"{prefix}{sample}_val_losses"])


def test_official_calling_convention_test_and_train_modes() -> None:
    _, ref, losses = fixture()
    batch = official_batch("mr", "A")
    with torch.no_grad():
        test = forward_reference(model("mr"), batch, "test")
        train = forward_reference(model("mr"), batch, "train")
    assert set(test) == {"_out"} and "_out" not in train
    np.testing.assert_allclose(test["_out"]["boundary"].numpy(), ref["A_boundary"], rtol=0, atol=1e-4)
    assert_losses(train, losses["A_val_losses"])  # eval mode: the same losses as the val run


@pytest.mark.parametrize("kind", ["mr", "hd"])
def test_padded_train_batch(kind: str) -> None:
    """B=2 batch [A, B] padded to T=75, L=12, M=2: intermediates, targets, losses and gradient norm."""
    _, ref, losses = fixture()
    prefix = f"{CONFIGS[kind][2]}batch_"
    batch = official_batch(kind, "AB")
    video_mask, query_mask = batch["video"][:, :, 0].isfinite(), batch["query"][:, :, 0].isfinite()
    video = torch.nan_to_num(batch["video"], posinf=0.0).view(2, video_mask.size(1), 4, 50, 768)
    query = torch.nan_to_num(batch["query"], posinf=0.0).view(2, query_mask.size(1), 4, 512)
    fps = torch.tensor(batch["fps"])
    targets = Targets(batch["saliency"], batch["pos_clip"][:, 0], fps, batch["boundary"])
    net = model(kind)
    net.zero_grad()
    out = net(video, video_mask, query, query_mask, targets=targets)
    got = {
        "video_msk": out.video_mask.long(),
        "class_logits": out.class_logits,
        "pymid_msk": out.pymid_mask.long(),
        "video_emb": out.video_emb,
        "query_emb": out.query_emb,
    }
    if kind == "mr":
        cls_tgt, reg_tgt = assign_targets(out.points, batch["boundary"], fps, 1.5)
        got |= {"coord": out.coord, "points": out.points, "cls_tgt": cls_tgt}
        positive = ref[prefix + "cls_tgt"] == 1
        assert positive.any()
        assert_close(reg_tgt.numpy()[positive], ref[prefix + "reg_tgt"][positive], name="reg_tgt")
    for name, tensor in got.items():
        assert_close(tensor, ref[prefix + name], name=name)

    assert_losses(out.losses, losses[f"{CONFIGS[kind][2]}train_batch_losses"])
    out.loss.backward()
    grads = [p.grad.double() for p in net.parameters() if p.grad is not None]
    norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
    net.zero_grad()
    assert norm == pytest.approx(losses[f"{CONFIGS[kind][2]}train_batch_grad_l2norm"], rel=1e-5)


@pytest.mark.parametrize("sample", ["A"])
def test_grounder_on_official_checkpoint_matches_reference(tmp_path: Path, sample: str) -> None:
    _, ref, _ = fixture()
    path = tmp_path / "official.pth"
    state = torch.load(FIXTURE / "state_dict.pt", weights_only=True)
    torch.save({"state_dict": state, "meta": {"epoch": 30}}, path)
    grounder = Grounder.from_checkpoint(path, preset="qvhighlights")
    video, query = tokens(sample)
    pred = grounder.predict(video.half().numpy(), query.numpy(), fps=0.5)  # fp16 as stored (exact here)
    np.testing.assert_allclose(pred.moments, ref[f"{sample}_boundary"], rtol=0, atol=1e-4)
    assert_close(pred.saliency, ref[f"{sample}_saliency"], name="saliency")
    assert pred.moments.dtype == np.float32 and np.all(np.diff(pred.moments[:, 2]) <= 0)
