// The SIMD row loops of the CPU chunk ops, compiled once per CPU capability and picked at run time.
//
// csrc/kernels/row_kernels.cpp is compiled for DEFAULT, AVX2 and AVX512 (x86-64) with that level's
// flags and ATen's CPU_CAPABILITY defines, each copy in its own namespace aft_fast::<LEVEL>; the
// dispatcher (cpu_dispatch.cpp, compiled without SIMD flags) returns the table of the level this
// process runs, as ATen's DispatchStub does for its own kernels.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <c10/util/Half.h>

namespace aft_fast {

struct RowKernels {
  // max of z[0, n)
  float (*row_max)(const float* z, int64_t n);
  // z <- exp(z - shift) in place; returns the sum of the new values
  float (*exp_shift_sum)(float* z, int64_t n, float shift);
  // out <- fp16(exp(z - shift) * mult), z untouched; returns the sum of exp(z - shift) in fp32
  float (*exp_shift_sum_half)(const float* z, at::Half* out, int64_t n, float shift, float mult);
  // z <- float(q) * factor
  void (*half_scaled)(const at::Half* q, float* z, int64_t n, float factor);
  // z <- z * factor
  void (*scale)(float* z, int64_t n, float factor);
  // z <- z + b
  void (*add)(float* z, const float* b, int64_t n);
  // The soft cap (logits = cap * tanh(y), docs/design.md section 2):
  // z <- tanh(z) in place
  void (*tanh_inplace)(float* z, int64_t n);
  // z <- exp(a * z - shift) * (1 - z^2) in place, returns the sum of exp(a * z - shift): for z = tanh(y),
  // the unnormalized probability times d tanh / d y, and the softmax's denominator (one exp an element)
  float (*softcap_exp_sum)(float* z, int64_t n, float a, float shift);
};

// The table of the level chosen for this process (chosen at the first call; see cpu_dispatch.cpp).
const RowKernels& row_kernels();

// How the level was chosen, for cpu_info().
struct CpuDispatch {
  std::string level;             // "default", "avx2" or "avx512": the level in use
  std::string reason;            // why that one
  std::string aten_level;        // at::get_cpu_capability(), ATen's own level (ATEN_CPU_CAPABILITY caps it)
  std::string cpu_best;          // the highest compiled level the CPU's features allow
};
const CpuDispatch& cpu_dispatch();

// The levels this build compiled, lowest first.
std::vector<std::string> compiled_levels();

// The x86 features the levels need, as the CPU (and OS) report them; empty on other architectures.
std::vector<std::pair<std::string, bool>> cpu_features();

}  // namespace aft_fast
