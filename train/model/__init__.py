"""The R²-Tuning model: R² block, pyramid, heads, point generator, losses and decoding."""

from train.model.decode import decode_boundaries, decode_saliency, decode_sample
from train.model.outputs import R2Output
from train.model.r2tuning import R2Tuning, count_parameters
from train.model.targets import Targets, assign_targets

__all__ = [
    "R2Output",
    "R2Tuning",
    "Targets",
    "assign_targets",
    "count_parameters",
    "decode_boundaries",
    "decode_sample",
    "decode_saliency",
]
