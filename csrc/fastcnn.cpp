// The extension module fastcnn._C: op schemas live in csrc/ops.cpp (TORCH_LIBRARY), CPU
// kernels in csrc/cpu/, CUDA kernels in csrc/cuda/, each registered for its dispatch key.
// This file only exposes what was compiled in (kernels, CUDA architectures), for fastcnn.info()
// and fastcnn.backend, and the CPU capability
// (DEFAULT / AVX2 build of the CPU kernels, csrc/cpu/channel_act_cpu.h) in use.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cpu/channel_act_cpu.h"

static bool has_cpu() { return true; }

static bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The CUDA architectures this library holds code for, as setup.py recorded them from nvcc's
// -gencode flags: FASTCNN_CUDA_SASS (cubins) and FASTCNN_CUDA_PTX (PTX), comma-separated
// compute capabilities x10, negative for arch-specific targets (sm_90a). fastcnn.backend
// compares them with a GPU's capability, so that a GPU the library cannot run on makes the
// `cuda` backend unavailable (with a message) instead of failing at the first kernel launch.
static std::vector<std::string> cuda_archs() {
  std::vector<std::string> out;
#ifdef WITH_CUDA
#if !defined(FASTCNN_CUDA_SASS) || !defined(FASTCNN_CUDA_PTX)
#error "setup.py records the CUDA architectures as FASTCNN_CUDA_SASS / FASTCNN_CUDA_PTX"
#endif
  auto add = [&out](const char* prefix, const std::vector<int>& archs) {
    for (int a : archs) {
      if (a == 0) continue;  // "none of this kind"
      out.push_back(std::string(prefix) + std::to_string(a < 0 ? -a : a) + (a < 0 ? "a" : ""));
    }
  };
  add("sm_", {FASTCNN_CUDA_SASS});
  add("compute_", {FASTCNN_CUDA_PTX});
#endif
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcnn fused kernels (ops are registered as torch.ops.fastcnn.*)";
  m.def("has_cpu", &has_cpu, "whether the CPU kernels are compiled in");
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels are compiled in");
  m.def("cuda_archs", &cuda_archs,
        "the CUDA architectures compiled in: 'sm_XY' (machine code) and 'compute_XY' (PTX); empty without CUDA");
  m.def("cpu_capability", [] { return std::string(fastcnn::cpu::capability_name(fastcnn::cpu::capability())); },
        "the CPU kernel build in use: 'avx2' or 'default'");
  m.def("cpu_capabilities", &fastcnn::cpu::available_capabilities,
        "the CPU kernel builds usable on this machine ('default' first, best last)");
  m.def("_set_cpu_capability", &fastcnn::cpu::set_capability, pybind11::arg("name"),
        "choose the CPU kernel build: 'auto', 'default' or 'avx2' (for tests and benchmarks)");
}
