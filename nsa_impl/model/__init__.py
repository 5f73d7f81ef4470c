"""A small NSA decoder (RMSNorm + `NSAAttention` + MLP) and a toy training loop.

Meant as a worked example and a smoke test that NSA trains end to end (gradients through every
branch, the gates and a learnable phi), not as a production model.
"""

from .block import MLP, NSADecoderBlock
from .dense import DenseAttention
from .toy import NSAToyLM, train_toy

__all__ = ["MLP", "DenseAttention", "NSADecoderBlock", "NSAToyLM", "train_toy"]
