// The matrix products of the CPU chunk ops: out (+)= a @ b in fp32.
//
// oneDNN (bundled in libtorch as at::native::mkldnn_matmul) runs these [chunk, H] x [H, V]-sized fp32
// products 12-30% faster than ATen's default (MKL sgemm) on the AMD EPYC machines we measure on, and
// takes transposed operands and beta = 1 accumulation without copies. It is not in torch's installed
// headers, so CMake checks that the symbol links (AFT_FAST_ONEDNN); without it, or with
// AFT_FAST_CPU_GEMM=aten in the environment, the products go through at::mm_out / addmm_.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <cstdlib>
#include <cstring>

#ifdef AFT_FAST_ONEDNN
namespace at::native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                             float beta, float alpha);
}  // namespace at::native
#endif

namespace aft_fast {

const char* gemm_backend() {
#ifdef AFT_FAST_ONEDNN
  static const bool aten = [] {
    const char* v = std::getenv("AFT_FAST_CPU_GEMM");
    return v != nullptr && std::strcmp(v, "aten") == 0;
  }();
  return aten ? "aten" : "onednn";
#else
  return "aten";
#endif
}

void gemm_into(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate) {
  RECORD_FUNCTION("aft_fast::gemm", std::vector<c10::IValue>());  // one event a product in profiler traces
#ifdef AFT_FAST_ONEDNN
  if (gemm_backend()[0] == 'o' && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
      out.scalar_type() == at::kFloat && out.is_contiguous()) {
    at::native::mkldnn_matmul(a, b, out, accumulate ? 1.f : 0.f, 1.f);
    return;
  }
#endif
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

}  // namespace aft_fast
