// The se_block family's CPU kernels: the device-generic op code
// (csrc/ops/se_block/se_block_kernel.h) instantiated for the CPU channel_act kernels
// (csrc/channel_act/cpu/) and registered for the CPU dispatch key.
#include <torch/library.h>

#include "ops/se_block/se_block_kernel.h"

namespace fastcnn {

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("se_block_forward", &se_block_forward<c10::kCPU>);
  m.impl("se_block_backward", &se_block_backward<c10::kCPU>);
}

}  // namespace fastcnn
