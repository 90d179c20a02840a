// The bn_act family's CPU kernels: the device-generic op code (csrc/ops/bn_act/bn_act_kernel.h)
// instantiated for the CPU channel_act kernels (csrc/channel_act/cpu/) and registered for the
// CPU dispatch key.
#include <torch/library.h>

#include "ops/bn_act/bn_act_kernel.h"

namespace fastcnn {

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("bn_act_forward", &bn_act_forward<c10::kCPU>);
  m.impl("bn_act_apply", &bn_act_apply<c10::kCPU>);
  m.impl("bn_act_backward", &bn_act_backward<c10::kCPU>);
  m.impl("scale_shift_act", &scale_shift_act<c10::kCPU>);
  m.impl("scale_shift_act_backward", &scale_shift_act_backward<c10::kCPU>);
}

}  // namespace fastcnn
