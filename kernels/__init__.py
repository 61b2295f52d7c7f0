"""Triton kernels of the fused AFT loss (installed as `aft_fast.kernels`), one concern per file.

linear_logprob      linear_logprob_fwd: per-token log-prob and log-sum-exp, logits kept in registers
linear_logprob_bwd  linear_logprob_bwd: recomputed logit tiles -> grad_hidden (by row), grad_weight,
                    grad_bias
group_loss          group_loss_fwd: the group losses of docs/design.md section 2 and their gradients;
                    launch_group_loss: the same kernel on a range of groups, blocks fixed (no sync)
chunk_softmax       row kernels of the chunked strategy: in-place log-sum-exp / target log-prob on a
                    [chunk, V] logits buffer, then coef * (onehot - softmax) for the cuBLAS products
_utils              block configs (autotuned on GPU), the interpreter switch, shared jit helpers

Import the launchers from their modules (the package does not re-export them, so that a module and
its launcher never shadow each other). Importing needs triton, not a GPU.
"""
