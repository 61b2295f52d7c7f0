// The one registry of aft_fast's C++ ops, and the Python module that loading them needs.
#include "ops.h"

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#ifndef AFT_FAST_CPU_CAPABILITY
#define AFT_FAST_CPU_CAPABILITY "DEFAULT"
#endif

TORCH_LIBRARY(aft_fast, m) {
  m.def(
      "chunk_logprob(Tensor h, Tensor weight, Tensor? bias, Tensor targets, Tensor(a!) buf, "
      "Tensor? lse, Tensor? segments, Tensor(b!)? sums, Tensor(c!)? keep=None, "
      "Tensor(d!)? keep_scale=None) -> (Tensor, Tensor)");
  m.def(
      "chunk_grad(Tensor(a!) probs, Tensor coef, Tensor targets, Tensor h, Tensor weight, Tensor rows, "
      "Tensor(b!)? grad_hidden, Tensor(c!)? grad_weight, Tensor(d!)? grad_bias) -> ()");
  m.def("gemm(Tensor a, Tensor b, Tensor(a!) out, bool accumulate) -> ()");
  m.def(
      "chunk_grad_kept(Tensor keep, Tensor keep_scale, Tensor logp, Tensor(a!) buf, Tensor coef, "
      "Tensor targets, Tensor h, Tensor weight, Tensor rows, Tensor(b!)? grad_hidden, "
      "Tensor(c!)? grad_weight, Tensor(d!)? grad_bias) -> ()");
}

TORCH_LIBRARY_IMPL(aft_fast, CPU, m) {
  m.impl("chunk_logprob", &aft_fast::chunk_logprob);
  m.impl("chunk_grad", &aft_fast::chunk_grad);
  m.impl("chunk_grad_kept", &aft_fast::chunk_grad_kept);
  m.impl("gemm", [](const at::Tensor& a, const at::Tensor& b, at::Tensor out, bool accumulate) {
    aft_fast::gemm_into(a, b, out, accumulate);
  });
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "aft_fast C++ CPU ops; loading this module registers torch.ops.aft_fast.*";
  m.def("build_info", []() {
    pybind11::dict info;
    info["cpu_capability"] = AFT_FAST_CPU_CAPABILITY;
    info["parallel"] = at::get_parallel_info();
    info["gemm"] = aft_fast::gemm_backend();
    return info;
  });
}
