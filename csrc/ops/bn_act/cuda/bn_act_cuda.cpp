// The bn_act family's CUDA kernels: the device-generic op code (csrc/ops/bn_act/bn_act_kernel.h)
// instantiated for the CUDA channel_act kernels (csrc/channel_act/cuda/channel_act_kernel.cu)
// and registered for the CUDA dispatch key. A C++ file (the op code is host code; the kernels
// are in the .cu), compiled in every build by setup.py, hence guarded: empty without WITH_CUDA.
#ifdef WITH_CUDA

#include <torch/library.h>

#include "ops/bn_act/bn_act_kernel.h"

namespace fastcnn {

TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) {
  m.impl("bn_act_forward", &bn_act_forward<c10::kCUDA>);
  m.impl("bn_act_apply", &bn_act_apply<c10::kCUDA>);
  m.impl("bn_act_backward", &bn_act_backward<c10::kCUDA>);
  m.impl("scale_shift_act", &scale_shift_act<c10::kCUDA>);
  m.impl("scale_shift_act_backward", &scale_shift_act_backward<c10::kCUDA>);
}

}  // namespace fastcnn

#endif  // WITH_CUDA
