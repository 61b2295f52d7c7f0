// Which copy of the row loops (csrc/kernels/row_kernels.cpp) this process runs, chosen once at the
// first call: the highest level that was compiled, that the CPU's features allow, and that ATen itself
// runs (at::get_cpu_capability(), which ATEN_CPU_CAPABILITY lowers). AFT_FAST_CPU_CAPABILITY=default,
// avx2 or avx512 forces a lower level (tests run every level this way); one above what the machine
// runs is clamped to that, with a warning. Compiled without SIMD flags: this file runs everywhere.
#include "cpu_kernels.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#define AFT_FAST_X86 1
#endif

namespace aft_fast {

namespace DEFAULT {
const RowKernels& row_kernels();
}
#ifdef AFT_FAST_HAVE_AVX2
namespace AVX2 {
const RowKernels& row_kernels();
}
#endif
#ifdef AFT_FAST_HAVE_AVX512
namespace AVX512 {
const RowKernels& row_kernels();
}
#endif

namespace {

// Levels in order, as AFT_FAST_CPU_CAPABILITY and ATEN_CPU_CAPABILITY spell them.
constexpr const char* kLevels[] = {"default", "avx2", "avx512"};

int highest_compiled() {
#if defined(AFT_FAST_HAVE_AVX512)
  return 2;
#elif defined(AFT_FAST_HAVE_AVX2)
  return 1;
#else
  return 0;
#endif
}

#ifdef AFT_FAST_X86
// The features each level's flags use (-mavx2 -mfma -mf16c; -mavx512f/bw/vl/dq -mfma). GCC's and
// clang's __builtin_cpu_supports also check that the OS saves the AVX / AVX-512 registers.
constexpr const char* kAvx2Needs[] = {"avx2", "fma", "f16c"};
constexpr const char* kAvx512Needs[] = {"avx512f", "avx512bw", "avx512vl", "avx512dq"};

bool supports(const std::string& f) {
  __builtin_cpu_init();
  if (f == "avx2") return __builtin_cpu_supports("avx2");
  if (f == "fma") return __builtin_cpu_supports("fma");
  if (f == "f16c") return __builtin_cpu_supports("f16c");
  if (f == "avx512f") return __builtin_cpu_supports("avx512f");
  if (f == "avx512bw") return __builtin_cpu_supports("avx512bw");
  if (f == "avx512vl") return __builtin_cpu_supports("avx512vl");
  if (f == "avx512dq") return __builtin_cpu_supports("avx512dq");
  return false;
}

std::string missing(const char* const* begin, const char* const* end) {
  std::string out;
  for (auto it = begin; it != end; ++it) {
    if (!supports(*it)) out += (out.empty() ? "" : ", ") + std::string(*it);
  }
  return out;
}
#endif

CpuDispatch choose(int& chosen) {
  CpuDispatch d;
  int best = highest_compiled();
  std::string limit = best < 2 ? std::string("the build compiles nothing above ") + kLevels[best] : "";
#ifdef AFT_FAST_X86
  const std::string no512 = missing(std::begin(kAvx512Needs), std::end(kAvx512Needs));
  const std::string no2 = missing(std::begin(kAvx2Needs), std::end(kAvx2Needs));
  int cpu = !no2.empty() ? 0 : !no512.empty() ? 1 : 2;
  if (cpu < best) {
    best = cpu;
    limit = "the CPU lacks " + (cpu == 0 ? no2 : no512);
  }
  d.cpu_best = kLevels[best];
  // "AVX512", "AVX2", or "DEFAULT" / "NO AVX" (by torch version) on x86.
  const std::string aten_name = at::get_cpu_capability();
  const int aten = aten_name == "AVX512" ? 2 : aten_name == "AVX2" ? 1 : 0;
  d.aten_level = kLevels[aten];
  if (aten < best) {
    best = aten;
    limit = "ATen runs " + d.aten_level + " (at::get_cpu_capability(); ATEN_CPU_CAPABILITY lowers it)";
  }
#else
  d.cpu_best = kLevels[best];
  d.aten_level = "default";  // non-x86 builds compile the DEFAULT loops only
  limit = "no x86 SIMD levels on this architecture";
#endif
  chosen = best;
  d.reason = best == 2 ? "the highest level, which this CPU runs" : "the highest this machine runs: " + limit;

  const char* env = std::getenv("AFT_FAST_CPU_CAPABILITY");
  std::string asked = env ? env : "";
  std::transform(asked.begin(), asked.end(), asked.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  if (!asked.empty()) {
    const auto it = std::find(std::begin(kLevels), std::end(kLevels), asked);
    TORCH_CHECK(it != std::end(kLevels), "AFT_FAST_CPU_CAPABILITY: expected default, avx2 or avx512, got '",
                env, "'");
    const int want = static_cast<int>(it - std::begin(kLevels));
    if (want <= best) {
      chosen = want;
      d.reason = "forced by AFT_FAST_CPU_CAPABILITY=" + asked;
    } else {
      d.reason = "AFT_FAST_CPU_CAPABILITY=" + asked + " asks more than this machine runs (" + limit +
                 "): clamped to " + kLevels[best];
      TORCH_WARN("aft_fast: ", d.reason);
    }
  }
  d.level = kLevels[chosen];
  return d;
}

struct Choice {
  CpuDispatch info;
  const RowKernels* kernels = nullptr;
};

const Choice& choice() {
  static const Choice c = [] {
    Choice out;
    int level = 0;
    out.info = choose(level);
    out.kernels = &DEFAULT::row_kernels();
#ifdef AFT_FAST_HAVE_AVX2
    if (level == 1) out.kernels = &AVX2::row_kernels();
#endif
#ifdef AFT_FAST_HAVE_AVX512
    if (level == 2) out.kernels = &AVX512::row_kernels();
#endif
    return out;
  }();
  return c;
}

}  // namespace

const RowKernels& row_kernels() { return *choice().kernels; }

const CpuDispatch& cpu_dispatch() { return choice().info; }

std::vector<std::string> compiled_levels() {
  return std::vector<std::string>(std::begin(kLevels), std::begin(kLevels) + highest_compiled() + 1);
}

std::vector<std::pair<std::string, bool>> cpu_features() {
  std::vector<std::pair<std::string, bool>> out;
#ifdef AFT_FAST_X86
  for (const char* f : kAvx2Needs) out.emplace_back(f, supports(f));
  for (const char* f : kAvx512Needs) out.emplace_back(f, supports(f));
#endif
  return out;
}

}  // namespace aft_fast
