// The extension module fastcnn._C: op schemas live in csrc/ops.cpp (TORCH_LIBRARY), CPU
// kernels in csrc/cpu/, CUDA kernels in csrc/cuda/, each registered for its dispatch key.
// This file only exposes what was compiled in, for fastcnn.info().
#include <torch/extension.h>

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
}
