"""Post-norm transformer decoder layer (order: cross-attention, self-attention, FFN) with drop-path."""

from __future__ import annotations

import torch
from torch import nn

from train.model.attention import MultiHeadAttention


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's branch with probability ``p``, scale the rest.

    ``x / (1 - p) * floor(1 - p + U[0, 1))`` per sample; identity in eval mode or when ``p == 0``.
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, *) -> same shape."""
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        shape = (x.size(0),) + (1,) * (x.dim() - 1)
        mask = (keep + torch.rand(shape, dtype=x.dtype, device=x.device)).floor()
        return x / keep * mask


class FeedForward(nn.Module):
    """``Linear(D, rD) -> ReLU -> Linear(rD, D)``, kaiming-normal (fan_out) weights, zero biases."""

    def __init__(self, dims: int, ratio: int = 4) -> None:
        super().__init__()
        self.mapping = nn.Sequential(nn.Linear(dims, dims * ratio), nn.ReLU(), nn.Linear(dims * ratio, dims))
        for layer in (self.mapping[0], self.mapping[2]):
            assert isinstance(layer, nn.Linear)
            nn.init.kaiming_normal_(layer.weight, a=0, mode="fan_out", nonlinearity="leaky_relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.mapping(x)


class TransformerDecoderLayer(nn.Module):
    """One post-norm decoder layer: frames attend to the query tokens, then to each other.

    With ``pe`` the positional encoding of the frames::

        x = LN_ca (x + DropPath(CrossAtt(q = x + pe, k = v = mem, key_mask = mem_mask)))
        x = LN_sa (x + DropPath(SelfAtt (q = k = x + pe, v = x,   key_mask = x_mask)))
        x = LN_ffn(x + DropPath(FFN(x)))

    Args:
        dims: D. heads: attention heads. ratio: FFN expansion. droppath: drop-path rate.
    """

    def __init__(self, dims: int, heads: int = 8, ratio: int = 4, droppath: float = 0.1) -> None:
        super().__init__()
        self.cross_att = MultiHeadAttention(dims, heads)
        self.cross_att_norm = nn.LayerNorm(dims)
        self.self_att = MultiHeadAttention(dims, heads)
        self.self_att_norm = nn.LayerNorm(dims)
        self.ffn = FeedForward(dims, ratio)
        self.ffn_norm = nn.LayerNorm(dims)
        self.droppath = DropPath(droppath)

    def forward(
        self,
        x: torch.Tensor,
        mem: torch.Tensor,
        pe: torch.Tensor,
        x_mask: torch.Tensor,
        mem_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Refine frames ``x`` (B, T, D) with query tokens ``mem`` (B, L, D).

        ``pe`` (B, T, D) positional encoding of the frames; ``x_mask`` (B, T), ``mem_mask`` (B, L) bool,
        True = valid. Returns (B, T, D).
        """
        q = x + pe
        x = self.cross_att_norm(x + self.droppath(self.cross_att(q, mem, mem, mem_mask)))
        q = x + pe
        x = self.self_att_norm(x + self.droppath(self.self_att(q, q, x, x_mask)))
        return self.ffn_norm(x + self.droppath(self.ffn(x)))
