// The extension module fastcnn._C: op schemas live in csrc/ops.cpp (TORCH_LIBRARY), CPU
// kernels in csrc/cpu/, CUDA kernels in csrc/cuda/, each registered for its dispatch key.
// This file only exposes what was compiled in, for fastcnn.info(), and the CPU capability
// (DEFAULT / AVX2 build of the CPU kernels, csrc/cpu/channel_act_cpu.h) in use.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "cpu/channel_act_cpu.h"

static bool has_cpu() { return true; }

static bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcnn fused kernels (ops are registered as torch.ops.fastcnn.*)";
  m.def("has_cpu", &has_cpu, "whether the CPU kernels are compiled in");
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels are compiled in");
  m.def("cpu_capability", [] { return std::string(fastcnn::cpu::capability_name(fastcnn::cpu::capability())); },
        "the CPU kernel build in use: 'avx2' or 'default'");
  m.def("cpu_capabilities", &fastcnn::cpu::available_capabilities,
        "the CPU kernel builds usable on this machine ('default' first, best last)");
  m.def("_set_cpu_capability", &fastcnn::cpu::set_capability, pybind11::arg("name"),
        "choose the CPU kernel build: 'auto', 'default' or 'avx2' (for tests and benchmarks)");
}
