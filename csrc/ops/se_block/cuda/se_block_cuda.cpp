// The se_block family's CUDA kernels: the device-generic op code
// (csrc/ops/se_block/se_block_kernel.h) instantiated for the CUDA channel_act kernels
// (csrc/channel_act/cuda/channel_act_kernel.cu) and registered for the CUDA dispatch key. A C++
// file (the op code is host code; the kernels are in the .cu), compiled in every build by
// setup.py, hence guarded: empty without WITH_CUDA.
#ifdef WITH_CUDA

#include <torch/library.h>

#include "ops/se_block/se_block_kernel.h"

namespace fastcnn {

TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) {
  m.impl("se_block_forward", &se_block_forward<c10::kCUDA>);
  m.impl("se_block_backward", &se_block_backward<c10::kCUDA>);
}

}  // namespace fastcnn

#endif  // WITH_CUDA
