// The row loops of the CPU chunk ops (ATen's at::vec::Vectorized), compiled once per CPU capability:
// CMake builds this file with CPU_CAPABILITY=<LEVEL>, CPU_CAPABILITY_<LEVEL> and that level's -m flags.
// Everything here lives in aft_fast::<LEVEL> (ATen's vec types in at::vec::<LEVEL>), so the copies do
// not clash; only what this file defines may use the level's instructions.
#include "cpu_kernels.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#ifndef CPU_CAPABILITY
#error "row_kernels.cpp is compiled once per CPU capability: CMake defines CPU_CAPABILITY"
#endif

namespace aft_fast::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
using VecH = at::vec::Vectorized<at::Half>;

float row_max(const float* z, int64_t n) {
  int64_t i = 0;
  Vec acc(-std::numeric_limits<float>::infinity());
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(z + i));
  float m = at::vec::vec_reduce_all<float>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, acc);
  for (; i < n; ++i) m = std::max(m, z[i]);
  return m;
}

float exp_shift_sum(float* z, int64_t n, float shift) {
  int64_t i = 0;
  const Vec vshift(shift);
  Vec acc(0.f);
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec e = (Vec::loadu(z + i) - vshift).exp_u20();
    e.store(z + i);
    acc = acc + e;
  }
  float s = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) {
    z[i] = std::exp(z[i] - shift);
    s += z[i];
  }
  return s;
}

float exp_shift_sum_half(const float* z, at::Half* out, int64_t n, float shift, float mult) {
  int64_t i = 0;
  const Vec vshift(shift), vmult(mult);
  Vec acc(0.f);
  for (; i + VecH::size() <= n; i += VecH::size()) {  // VecH holds two Vecs' worth
    Vec a = (Vec::loadu(z + i) - vshift).exp_u20();
    Vec b = (Vec::loadu(z + i + Vec::size()) - vshift).exp_u20();
    acc = acc + a + b;
    at::vec::convert_from_float<at::Half>(a * vmult, b * vmult).store(out + i);
  }
  float s = at::vec::vec_reduce_all<float>([](const Vec& x, const Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) {
    const float e = std::exp(z[i] - shift);
    s += e;
    out[i] = static_cast<at::Half>(e * mult);
  }
  return s;
}

void half_scaled(const at::Half* q, float* z, int64_t n, float factor) {
  int64_t i = 0;
  const Vec f(factor);
  for (; i + VecH::size() <= n; i += VecH::size()) {
    auto [a, b] = at::vec::convert_to_float<at::Half>(VecH::loadu(q + i));
    (a * f).store(z + i);
    (b * f).store(z + i + Vec::size());
  }
  for (; i < n; ++i) z[i] = static_cast<float>(q[i]) * factor;
}

void scale(float* z, int64_t n, float factor) {
  int64_t i = 0;
  const Vec f(factor);
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(z + i) * f).store(z + i);
  for (; i < n; ++i) z[i] *= factor;
}

void add(float* z, const float* b, int64_t n) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(z + i) + Vec::loadu(b + i)).store(z + i);
  for (; i < n; ++i) z[i] += b[i];
}

void tanh_inplace(float* z, int64_t n) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) Vec::loadu(z + i).tanh().store(z + i);
  for (; i < n; ++i) z[i] = std::tanh(z[i]);
}

float softcap_exp_sum(float* z, int64_t n, float a, float shift) {
  int64_t i = 0;
  const Vec va(a), vshift(shift), one(1.f);
  Vec acc(0.f);
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec t = Vec::loadu(z + i);
    const Vec e = (t * va - vshift).exp_u20();
    acc = acc + e;
    (e * (one - t * t)).store(z + i);
  }
  float s = at::vec::vec_reduce_all<float>([](const Vec& x, const Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) {
    const float e = std::exp(a * z[i] - shift);
    s += e;
    z[i] = e * (1.f - z[i] * z[i]);
  }
  return s;
}

constexpr RowKernels kKernels{&row_max, &exp_shift_sum, &exp_shift_sum_half, &half_scaled, &scale, &add,
                              &tanh_inplace, &softcap_exp_sum};

}  // namespace

const RowKernels& row_kernels() { return kKernels; }

}  // namespace aft_fast::CPU_CAPABILITY
