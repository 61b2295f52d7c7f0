"""aft-fast: Alignment Fine-Tuning (arXiv 2309.02144) with a fused, chunked log-prob operator."""

from aft_fast.constants import BACKENDS, IGNORE_INDEX, MODES
from aft_fast.losses import AFTLoss, aft_loss, aft_loss_with, linear_logprob
from aft_fast.ops.cpp_chunks import cpu_info
from aft_fast.outputs import AFTOutput

__version__ = "0.1.0"

__all__ = ["aft_loss", "aft_loss_with", "linear_logprob", "AFTLoss", "AFTOutput", "MODES", "BACKENDS",
           "IGNORE_INDEX", "cpu_info"]
