// The extension module fastcnn._C. This file only exposes what was compiled in (kernels, CUDA
// architectures), for fastcnn.info() and fastcnn.backend, and the CPU capability (DEFAULT / AVX2
// build of the CPU kernels, csrc/channel_act/cpu/channel_act_cpu.h) in use. The ops themselves
// (torch.ops.fastcnn.*) register with the dispatcher from their own files, as torchvision's
// csrc/ops does:
//
//   csrc/fastcnn.cpp           this file (the Python module)
//   csrc/include/              helpers every part shares: act.h (activations), common.h
//                              (argument checks, layouts), layer_op.h (the composite ops'
//                              dispatcher handles and autograd bookkeeping), saved_hooks.h
//                              (saving past fastcnn.recompute's own saved-tensor hooks, with
//                              csrc/saved_hooks.cpp)
//   csrc/channel_act/          the per-channel affine + activation kernel library the bn_act and
//                              se_block families run on (cpu/, cpu/avx2/, cuda/); no ops
//   csrc/ops/<family>/         one folder per op family: bn_act, se_block, grouped_conv,
//                              conv_layers (conv_bn_act, conv_act, bn_act_conv; conv_node.h
//                              their convolution's autograd node). The family's top file
//                              declares its schemas (TORCH_LIBRARY_FRAGMENT; there is no central
//                              schema file) and the composites' CompositeExplicitAutograd +
//                              Autograd kernels; cpu/ registers the CPU dispatch key, cuda/ the
//                              CUDA key (a cuda/*.cpp is guarded by WITH_CUDA; *.cu files are
//                              only compiled in CUDA builds). Device-generic op code is a
//                              template over the device, instantiated by each device's file.
//
// setup.py compiles every csrc/**/*.cpp (the files in avx2/ folders with AVX2 flags) and, in
// CUDA builds, every csrc/**/*.cu, with csrc/ on the include path ("include/common.h", ...).
// fastcnn/ops/extension_backend.py registers the primitive ops' autograd formulas and every op's
// fake (meta) implementation for torch.compile.
//
// Conventions of every op: x and the returned activations share x's dtype (fp32, fp16 or bf16)
// and memory format (NCHW or channels_last); statistics and per-channel vectors are fp32;
// parameter gradients come back in the parameter's dtype; a gradient for an absent optional
// input (residual) is an empty tensor; backward ops have an Autograd fallthrough (they are not
// differentiable themselves).
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "channel_act/cpu/channel_act_cpu.h"
#include "include/python_calls.h"
#include "include/saved_hooks.h"

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
  m.def(
      "_set_recompute_pack_hook",
      [](pybind11::object pack) { fastcnn::set_recompute_pack_hook(pack.is_none() ? nullptr : pack.ptr()); },
      pybind11::arg("pack"),
      "register fastcnn.recompute's pack hook (None: none), past which the composite ops save the tensors it would "
      "keep as they are (csrc/include/saved_hooks.h)");
  fastcnn::register_python_calls(m);
}
