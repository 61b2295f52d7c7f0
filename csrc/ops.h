// Declarations of the aft_fast CPU ops (registered in bindings.cpp).
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace aft_fast {

// out = a @ b, or out += a @ b when `accumulate` (fp32; see gemm_cpu.cpp for which library runs it).
void gemm_into(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate);

// The library gemm_into uses in this process, chosen at its first call (see gemm_cpu.cpp).
struct GemmChoice {
  std::string name;             // "onednn" or "aten"
  std::string reason;           // e.g. "aten: oneDNN refused: <its message>"
  bool onednn_symbol = false;   // whether libtorch exports at::native::mkldnn_matmul
  void* onednn = nullptr;       // that function when it is used, else null
};
const GemmChoice& gemm_choice();

// "onednn" or "aten": gemm_choice().name.
const char* gemm_backend();

// Log-probs of one chunk of scored tokens, without a [T, V] buffer: buf [c, V] receives the logits
// (h [c, H] @ weight[V, H]^T + bias) and ends holding the softmax probabilities. With `lse` given
// (a recompute) it is used instead of being computed. When `segments` and `sums` are given, each
// token's log-prob is added to sums[segments[t]]. With `keep` (fp16 [c, V]) and `keep_scale` (fp32
// [c]) the probabilities are kept there instead, for a backward without recompute:
// p = float(keep) * keep_scale, and buf is scratch. Returns (logp [c], lse [c]), fp32.
// With `cap` (a soft cap, aft_fast/ops/logit_options.py) the logits are cap * tanh(h @ weight^T + bias),
// and buf ends holding p * (1 - tanh^2), plus tanh(target)^2 at each row's target, so that chunk_grad
// with coef * cap gives the gradient with respect to the pre-tanh values. Not with `keep`.
std::tuple<at::Tensor, at::Tensor> chunk_logprob(
    const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, at::Tensor& buf, const std::optional<at::Tensor>& lse,
    const std::optional<at::Tensor>& segments, const std::optional<at::Tensor>& sums,
    const std::optional<at::Tensor>& keep, const std::optional<at::Tensor>& keep_scale,
    std::optional<double> cap);

// Turns probs [c, V] into d(loss)/d(logits) = coef * (onehot(target) - probs) in place and
// accumulates grad_hidden[rows] += it @ weight, grad_weight += it^T @ h, grad_bias += column sums.
void chunk_grad(
    at::Tensor& probs, const at::Tensor& coef, const at::Tensor& targets, const at::Tensor& h,
    const at::Tensor& weight, const at::Tensor& rows, const std::optional<at::Tensor>& grad_hidden,
    const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias);

// chunk_grad from probabilities kept by chunk_logprob: buf [c, V] (fp32 scratch) receives
// coef * (onehot(target) - p), the target's entry from the fp32 log-prob `logp` [c]; then the same
// three accumulations.
void chunk_grad_kept(
    const at::Tensor& keep, const at::Tensor& keep_scale, const at::Tensor& logp, at::Tensor& buf,
    const at::Tensor& coef, const at::Tensor& targets, const at::Tensor& h, const at::Tensor& weight,
    const at::Tensor& rows, const std::optional<at::Tensor>& grad_hidden,
    const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias);

}  // namespace aft_fast
