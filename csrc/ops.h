// Declarations of the aft_fast CPU ops (registered in bindings.cpp).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace aft_fast {

// Log-probs of one chunk of scored tokens, without a [T, V] buffer: buf [c, V] receives the logits
// (h [c, H] @ weight[V, H]^T + bias) and ends holding the softmax probabilities. With `lse` given
// (a recompute) it is used instead of being computed. When `segments` and `sums` are given, each
// token's log-prob is added to sums[segments[t]]. Returns (logp [c], lse [c]), fp32.
std::tuple<at::Tensor, at::Tensor> chunk_logprob(
    const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, at::Tensor& buf, const std::optional<at::Tensor>& lse,
    const std::optional<at::Tensor>& segments, const std::optional<at::Tensor>& sums);

// Turns probs [c, V] into d(loss)/d(logits) = coef * (onehot(target) - probs) in place and
// accumulates grad_hidden[rows] += it @ weight, grad_weight += it^T @ h, grad_bias += column sums.
void chunk_grad(
    at::Tensor& probs, const at::Tensor& coef, const at::Tensor& targets, const at::Tensor& h,
    const at::Tensor& weight, const at::Tensor& rows, const std::optional<at::Tensor>& grad_hidden,
    const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias);

}  // namespace aft_fast
