// The one registry of aft_fast's C++ ops, and the Python module that loading them needs.
#include "cpu_kernels.h"
#include "ops.h"

#include <torch/library.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

TORCH_LIBRARY(aft_fast, m) {
  m.def(
      "chunk_logprob(Tensor h, Tensor weight, Tensor? bias, Tensor targets, Tensor(a!) buf, "
      "Tensor? lse, Tensor? segments, Tensor(b!)? sums, Tensor(c!)? keep=None, "
      "Tensor(d!)? keep_scale=None, float? cap=None) -> (Tensor, Tensor)");
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
  m.def("cpu_info", []() {
    // Resolves both run-time choices (at most once per process) and says why each was made.
    const aft_fast::GemmChoice& g = aft_fast::gemm_choice();
    const aft_fast::CpuDispatch& d = aft_fast::cpu_dispatch();
    pybind11::dict info;
    info["gemm"] = g.name;
    info["gemm_reason"] = g.reason;
    info["onednn_symbol"] = g.onednn_symbol;
    info["cpu_capability"] = d.level;
    info["cpu_capability_reason"] = d.reason;
    info["cpu_capabilities_compiled"] = aft_fast::compiled_levels();
    info["cpu_capability_best"] = d.cpu_best;
    info["aten_cpu_capability"] = d.aten_level;
    pybind11::dict features;
    for (const auto& [name, has] : aft_fast::cpu_features()) features[name.c_str()] = has;
    info["cpu_features"] = features;
    return info;
  }, "The GEMM library and SIMD level this process runs, why, and the CPU features they depend on.");
  m.def("build_info", []() {
    pybind11::dict info;
    info["cpu_capabilities_compiled"] = aft_fast::compiled_levels();
    info["parallel"] = at::get_parallel_info();
    // The run-time choices too (see cpu_info for the reasons).
    info["cpu_capability"] = aft_fast::cpu_dispatch().level;
    info["gemm"] = aft_fast::gemm_backend();
    return info;
  });
}
