// CPU kernels of the fused linear log-prob: one chunk of scored tokens at a time.
//
// The matrix products go through ATen (MKL / oneDNN; gemm_cpu.cpp). What is fused here is everything
// between them: per row of the logits buffer, one read for the max, one pass that exponentiates in
// place while summing, one scaling pass, all while the row (V floats) sits in L2. Rows are spread over
// ATen's OpenMP threads. The row loops themselves are SIMD code compiled per CPU capability
// (kernels/row_kernels.cpp, picked at run time): this file is built without SIMD flags.
#include "cpu_kernels.h"
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <limits>

namespace aft_fast {
namespace {

void check_f32_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, name, ": expected 2-D, got ", t.dim(), "-D");
}

void check_index(const at::Tensor& t, const char* name, int64_t length) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1,
              name, ": expected a 1-D int64 CPU tensor");
  TORCH_CHECK(t.numel() == length, name, ": expected length ", length, ", got ", t.numel());
}

// dst[rows[r]] += src[r] for every row of src. Rows repeat under prompt sharing, so the threads
// split the columns, never the rows (ATen's index_add_ on CPU is ~50x slower for this shape).
void add_rows(at::Tensor& dst, const at::Tensor& rows, const at::Tensor& src) {
  const int64_t c = src.size(0), H = src.size(1), stride = dst.stride(0);
  float* d = dst.data_ptr<float>();
  const float* s = src.data_ptr<float>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const auto add = row_kernels().add;
  at::parallel_for(0, H, 256, [&](int64_t h0, int64_t h1) {
    for (int64_t r = 0; r < c; ++r) add(d + rp[r] * stride + h0, s + r * H + h0, h1 - h0);
  });
}

// Kept probabilities: keep [c, V] fp16 and keep_scale [c] fp32, both contiguous.
void check_keep(const at::Tensor& keep, const at::Tensor& keep_scale, int64_t c, int64_t V) {
  TORCH_CHECK(keep.scalar_type() == at::kHalf && keep.is_contiguous() && keep.dim() == 2 &&
                  keep.size(0) == c && keep.size(1) == V,
              "keep: expected a contiguous float16 [", c, ", ", V, "] tensor");
  TORCH_CHECK(keep_scale.scalar_type() == at::kFloat && keep_scale.is_contiguous() && keep_scale.numel() == c,
              "keep_scale: expected a contiguous float32 [", c, "] tensor");
}

// Kept probabilities are stored as fp16(exp(z - max) * kKeepMult); see chunk_logprob.
constexpr float kKeepMult = 32768.f;

// Grain of the row loop: a few rows per task keeps each thread streaming whole rows.
constexpr int64_t kRowGrain = 4;

}  // namespace

std::tuple<at::Tensor, at::Tensor> chunk_logprob(
    const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, at::Tensor& buf, const std::optional<at::Tensor>& lse,
    const std::optional<at::Tensor>& segments, const std::optional<at::Tensor>& sums,
    const std::optional<at::Tensor>& keep, const std::optional<at::Tensor>& keep_scale,
    std::optional<double> cap) {
  check_f32_2d(h, "h");
  check_f32_2d(weight, "weight");
  check_f32_2d(buf, "buf");
  const int64_t c = h.size(0), V = weight.size(0);
  TORCH_CHECK(weight.size(1) == h.size(1), "weight: hidden size ", weight.size(1), " != h's ", h.size(1));
  TORCH_CHECK(buf.size(0) == c && buf.size(1) == V && buf.is_contiguous(),
              "buf: expected a contiguous [", c, ", ", V, "] buffer");
  check_index(targets, "targets", c);
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == V && bias->is_contiguous(),
                "bias: expected a contiguous float32 [", V, "]");
  }
  if (lse) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->numel() == c, "lse: expected float32 [", c, "]");
  }
  TORCH_CHECK(segments.has_value() == sums.has_value(), "segments and sums: give both or neither");
  TORCH_CHECK(keep.has_value() == keep_scale.has_value(), "keep and keep_scale: give both or neither");
  if (keep) {
    TORCH_CHECK(!lse, "keep: a recompute (lse given) has nothing to keep");
    TORCH_CHECK(!cap, "keep: kept probabilities carry no soft-cap derivative");
    check_keep(*keep, *keep_scale, c, V);
  }
  TORCH_CHECK(!cap || (std::isfinite(*cap) && *cap > 0), "cap: expected a positive soft cap, got ",
              cap.value_or(0.0));

  gemm_into(h, weight.t(), buf, false);

  auto opts = h.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({c}, opts);
  at::Tensor lse_out = lse ? lse->contiguous() : at::empty({c}, opts);
  at::Tensor tgt = targets.contiguous();
  const int64_t* tp = tgt.data_ptr<int64_t>();
  float* zp = buf.data_ptr<float>();
  float* lp = logp.data_ptr<float>();
  float* sp = lse_out.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const bool have_lse = lse.has_value();
  const float a = static_cast<float>(cap.value_or(1.0));
  at::Half* kp = keep ? keep->data_ptr<at::Half>() : nullptr;
  float* ksp = keep ? keep_scale->data_ptr<float>() : nullptr;
  std::atomic<int64_t> bad{-1};
  const RowKernels& k = row_kernels();

  at::parallel_for(0, c, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* z = zp + r * V;
      if (bp) k.add(z, bp, V);
      const int64_t t = tp[r];
      if (t < 0 || t >= V) {
        bad.store(r);
        continue;
      }
      if (cap) {
        // logits = a * tanh(z), max = a * max(tanh); p * (1 - tanh^2) = exp(logit - m) * (1 - tanh^2) / s.
        k.tanh_inplace(z, V);
        const float tt = z[t];
        float l = sp[r];
        if (have_lse) {
          k.softcap_exp_sum(z, V, a, l);
        } else {
          const float m = a * k.row_max(z, V);
          const float s = k.softcap_exp_sum(z, V, a, m);
          k.scale(z, V, 1.f / s);
          l = m + std::log(s);
        }
        z[t] += tt * tt;  // chunk_grad adds coef here: the target's entry becomes coef * (1 - tt^2) * (1 - p)
        lp[r] = a * tt - l;
        sp[r] = l;
        continue;
      }
      const float target_logit = z[t];
      float l;
      if (have_lse) {
        l = sp[r];
        k.exp_shift_sum(z, V, l);
      } else if (kp) {
        // exp(z - max) is in (0, 1]: times 2^15 it uses fp16's normal range down to 2^-29 of the
        // largest probability (relative error 2^-11 there), instead of flushing small ones.
        const float m = k.row_max(z, V);
        const float s = k.exp_shift_sum_half(z, kp + r * V, V, m, kKeepMult);
        ksp[r] = 1.f / (kKeepMult * s);
        l = m + std::log(s);
      } else {
        const float m = k.row_max(z, V);
        const float s = k.exp_shift_sum(z, V, m);
        k.scale(z, V, 1.f / s);
        l = m + std::log(s);
      }
      lp[r] = target_logit - l;
      sp[r] = l;
    }
  });
  TORCH_CHECK(bad.load() < 0, "targets: token id ", bad.load() >= 0 ? tp[bad.load()] : 0,
              " at position ", bad.load(), " is outside the vocabulary [0, ", V, ")");

  if (segments) {
    check_index(*segments, "segments", c);
    TORCH_CHECK(sums->scalar_type() == at::kFloat && sums->dim() == 1 && sums->is_contiguous(),
                "sums: expected a contiguous 1-D float32 tensor");
    const int64_t* seg = segments->data_ptr<int64_t>();
    float* acc = sums->data_ptr<float>();
    const int64_t S = sums->numel();
    for (int64_t r = 0; r < c; ++r) {
      TORCH_CHECK(seg[r] >= 0 && seg[r] < S, "segments: id ", seg[r], " outside [0, ", S, ")");
      acc[seg[r]] += lp[r];
    }
  }
  return {logp, lse_out};
}

namespace {

// grad_hidden[rows] += g @ weight, grad_weight += g^T @ h, grad_bias += column sums of g [c, V].
void accumulate_grads(
    const at::Tensor& g, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& rows,
    const std::optional<at::Tensor>& grad_hidden, const std::optional<at::Tensor>& grad_weight,
    const std::optional<at::Tensor>& grad_bias) {
  const int64_t c = g.size(0), V = g.size(1);
  if (grad_hidden) {
    TORCH_CHECK(grad_hidden->scalar_type() == at::kFloat && grad_hidden->dim() == 2 &&
                    grad_hidden->size(1) == h.size(1) && grad_hidden->stride(1) == 1,
                "grad_hidden: expected float32 [N, ", h.size(1), "] with contiguous rows");
    at::Tensor rows_c = rows.contiguous();
    const int64_t* rp = rows_c.data_ptr<int64_t>();
    for (int64_t r = 0; r < c; ++r) {
      TORCH_CHECK(rp[r] >= 0 && rp[r] < grad_hidden->size(0), "rows: index ", rp[r], " at position ", r,
                  " outside grad_hidden's ", grad_hidden->size(0), " rows");
    }
    at::Tensor src = at::empty({c, weight.size(1)}, g.options());
    gemm_into(g, weight, src, false);
    at::Tensor dst = *grad_hidden;
    add_rows(dst, rows_c, src);
  }
  if (grad_weight) {
    TORCH_CHECK(grad_weight->scalar_type() == at::kFloat && grad_weight->sizes() == weight.sizes(),
                "grad_weight: expected float32 of weight's shape");
    at::Tensor gw = *grad_weight;
    gemm_into(g.t(), h, gw, true);
  }
  if (grad_bias) {
    TORCH_CHECK(grad_bias->scalar_type() == at::kFloat && grad_bias->numel() == V,
                "grad_bias: expected float32 [", V, "]");
    grad_bias->add_(g.sum(0));
  }
}

void check_grad_inputs(const at::Tensor& buf, const at::Tensor& coef, const at::Tensor& targets,
                       const at::Tensor& h, const at::Tensor& weight, const at::Tensor& rows) {
  check_f32_2d(buf, "probs");
  check_f32_2d(h, "h");
  check_f32_2d(weight, "weight");
  const int64_t c = buf.size(0), V = buf.size(1);
  TORCH_CHECK(buf.is_contiguous() && weight.size(0) == V, "probs: expected a contiguous [c, V] buffer");
  TORCH_CHECK(h.size(0) == c, "h: expected ", c, " rows, got ", h.size(0));
  check_index(targets, "targets", c);
  check_index(rows, "rows", c);
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.numel() == c, "coef: expected float32 [", c, "]");
}

}  // namespace

void chunk_grad(
    at::Tensor& probs, const at::Tensor& coef, const at::Tensor& targets, const at::Tensor& h,
    const at::Tensor& weight, const at::Tensor& rows, const std::optional<at::Tensor>& grad_hidden,
    const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias) {
  check_grad_inputs(probs, coef, targets, h, weight, rows);
  const int64_t c = probs.size(0), V = probs.size(1);
  at::Tensor cf = coef.contiguous();
  at::Tensor tgt = targets.contiguous();
  const float* cp = cf.data_ptr<float>();
  const int64_t* tp = tgt.data_ptr<int64_t>();
  float* zp = probs.data_ptr<float>();
  std::atomic<int64_t> bad{-1};
  const auto scale = row_kernels().scale;
  at::parallel_for(0, c, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* z = zp + r * V;
      if (tp[r] < 0 || tp[r] >= V) {
        bad.store(r);
        continue;
      }
      scale(z, V, -cp[r]);
      z[tp[r]] += cp[r];
    }
  });
  TORCH_CHECK(bad.load() < 0, "targets: token id outside the vocabulary at position ", bad.load());
  accumulate_grads(probs, h, weight, rows, grad_hidden, grad_weight, grad_bias);
}

void chunk_grad_kept(
    const at::Tensor& keep, const at::Tensor& keep_scale, const at::Tensor& logp, at::Tensor& buf,
    const at::Tensor& coef, const at::Tensor& targets, const at::Tensor& h, const at::Tensor& weight,
    const at::Tensor& rows, const std::optional<at::Tensor>& grad_hidden,
    const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias) {
  check_grad_inputs(buf, coef, targets, h, weight, rows);
  const int64_t c = buf.size(0), V = buf.size(1);
  check_keep(keep, keep_scale, c, V);
  TORCH_CHECK(logp.scalar_type() == at::kFloat && logp.numel() == c, "logp: expected float32 [", c, "]");
  at::Tensor cf = coef.contiguous(), lp = logp.contiguous();
  at::Tensor tgt = targets.contiguous();
  const float* cp = cf.data_ptr<float>();
  const float* ksp = keep_scale.data_ptr<float>();
  const float* lpp = lp.data_ptr<float>();
  const int64_t* tp = tgt.data_ptr<int64_t>();
  const at::Half* kp = keep.data_ptr<at::Half>();
  float* zp = buf.data_ptr<float>();
  std::atomic<int64_t> bad{-1};
  const auto half_scaled = row_kernels().half_scaled;
  at::parallel_for(0, c, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (tp[r] < 0 || tp[r] >= V) {
        bad.store(r);
        continue;
      }
      float* z = zp + r * V;
      half_scaled(kp + r * V, z, V, -cp[r] * ksp[r]);  // -coef * p
      // The target's coef * (1 - p) from the exact fp32 log-prob: no cancellation when p is near 1.
      z[tp[r]] = -cp[r] * std::expm1(lpp[r]);
    }
  });
  TORCH_CHECK(bad.load() < 0, "targets: token id outside the vocabulary at position ", bad.load());
  accumulate_grads(buf, h, weight, rows, grad_hidden, grad_weight, grad_bias);
}

}  // namespace aft_fast
