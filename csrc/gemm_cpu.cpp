// The matrix products of the CPU chunk ops: out (+)= a @ b in fp32.
//
// oneDNN (bundled in libtorch as at::native::mkldnn_matmul) runs these [chunk, H] x [H, V]-sized fp32
// products 12-30% faster than ATen's default (MKL sgemm) on the AVX-512 machines we measure on, and
// takes transposed operands and beta = 1 accumulation without copies. But it is a private symbol (not
// in torch's installed headers), and on some CPUs it refuses fp32 products (on an AVX2-only EPYC:
// "mkldnn_matmul bf16 path needs the cpu support avx_ne_convert or avx512bw, ..."). So it is looked up
// at run time (a libtorch without it still loads this module) and probed once per process with small
// products of each layout the ops use, compared with ATen's mm; it is kept only when it runs and
// agrees. Otherwise, or with AFT_FAST_CPU_GEMM=aten, the products go through at::mm_out / addmm_.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <exception>
#include <sstream>

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#define AFT_FAST_HAVE_DLSYM 1
#endif

namespace aft_fast {
namespace {

using MatmulFn = void (*)(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                          float beta, float alpha);
// at::native::mkldnn_matmul(const Tensor&, const Tensor&, const Tensor&, float, float), Itanium ABI.
constexpr const char* kMatmulSymbol = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

MatmulFn find_matmul() {
#ifdef AFT_FAST_HAVE_DLSYM
  // Look in the libtorch that defines ATen's ops (this module links it, so it is loaded), then in the
  // global scope.
  void* sym = nullptr;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&at::_ops::mm::call), &info) != 0 && info.dli_fname != nullptr) {
    if (void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD)) {
      sym = dlsym(lib, kMatmulSymbol);
      dlclose(lib);  // drops the reference NOLOAD took; the library stays loaded
    }
  }
  if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, kMatmulSymbol);
  return reinterpret_cast<MatmulFn>(sym);
#else
  return nullptr;
#endif
}

// The first line of an error message (c10 appends a C++ stack trace in debug builds).
std::string first_line(const char* what) {
  std::string s(what ? what : "");
  return s.substr(0, s.find('\n'));
}

// Runs fn on the three layouts gemm_into gives it (a @ b^T, a @ b, a^T @ b accumulated into out) and
// compares with ATen's mm. Returns "" when every product agrees, else why oneDNN is not used.
// AFT_FAST_SIMULATE_ONEDNN_REFUSAL (tests only): "1" throws as oneDNN does on a CPU it refuses,
// "wrong" perturbs its result.
std::string probe(MatmulFn fn) {
  const std::string simulate = env("AFT_FAST_SIMULATE_ONEDNN_REFUSAL");
  try {
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    const at::Tensor a = at::sin(at::arange(13 * 37, f32).reshape({13, 37}) * 0.37);
    const at::Tensor b = at::cos(at::arange(29 * 37, f32).reshape({29, 37}) * 0.11);
    const at::Tensor c = at::sin(at::arange(13 * 29, f32).reshape({13, 29}) * 0.23);
    struct Case {
      at::Tensor x, y;
      float beta;
    };
    const Case cases[] = {{a, b.t(), 0.f}, {c, b, 0.f}, {c.t(), a, 1.f}};
    for (const Case& k : cases) {
      at::Tensor out = at::full({k.x.size(0), k.y.size(1)}, 0.5, f32);
      at::Tensor want = at::mm(k.x, k.y) + (k.beta != 0.f ? 0.5 : 0.0);
      TORCH_CHECK(simulate != "1", "mkldnn_matmul: simulated refusal (AFT_FAST_SIMULATE_ONEDNN_REFUSAL=1)");
      fn(k.x, k.y, out, k.beta, 1.f);
      if (simulate == "wrong") out.add_(1e-2);
      const double err = (out - want).abs().max().item<double>();
      const double tol = 1e-4 * (1.0 + want.abs().max().item<double>());
      if (!(err <= tol)) {
        std::ostringstream why;
        why << "oneDNN disagreed with ATen's mm (max error " << err << " on a [" << k.x.size(0) << ", "
            << k.x.size(1) << "] x [" << k.y.size(0) << ", " << k.y.size(1) << "] product)";
        return why.str();
      }
    }
  } catch (const c10::Error& e) {
    return "oneDNN refused: " + first_line(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return "oneDNN refused: " + first_line(e.what());
  }
  return "";
}

GemmChoice choose() {
  GemmChoice g;
  const std::string mode = env("AFT_FAST_CPU_GEMM");
  TORCH_CHECK(mode.empty() || mode == "aten" || mode == "auto",
              "AFT_FAST_CPU_GEMM: expected 'aten' (ATen's mm) or 'auto' (oneDNN where it runs), got '", mode,
              "'");
  MatmulFn fn = find_matmul();
  g.onednn_symbol = fn != nullptr;
  if (mode == "aten") {
    g.reason = "aten: forced by AFT_FAST_CPU_GEMM=aten";
  } else if (fn == nullptr) {
    g.reason = "aten: symbol not found (this libtorch exports no at::native::mkldnn_matmul)";
  } else if (std::string why = probe(fn); !why.empty()) {
    g.reason = "aten: " + why;
  } else {
    g.onednn = reinterpret_cast<void*>(fn);
    g.reason = "onednn: the probe products ran and matched ATen's mm";
  }
  g.name = g.onednn ? "onednn" : "aten";
  return g;
}

}  // namespace

const GemmChoice& gemm_choice() {
  static const GemmChoice g = choose();
  return g;
}

const char* gemm_backend() { return gemm_choice().name.c_str(); }

void gemm_into(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate) {
  RECORD_FUNCTION("aft_fast::gemm", std::vector<c10::IValue>());  // one event a product in profiler traces
  const GemmChoice& g = gemm_choice();
  if (g.onednn != nullptr && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
      out.scalar_type() == at::kFloat && out.is_contiguous()) {
    reinterpret_cast<MatmulFn>(g.onednn)(a, b, out, accumulate ? 1.f : 0.f, 1.f);
    return;
  }
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

}  // namespace aft_fast
