// The CPU kernels of csrc/channel_act/channel_act.h, once per CPU capability
// (csrc/channel_act/cpu/channel_act_impl.h compiled as DEFAULT and, on x86-64, as AVX2), and
// the capability in use at run time (csrc/channel_act/cpu/dispatch.cpp; fastcnn._C reports
// and sets it, csrc/fastcnn.cpp).
#pragma once

#include <string>
#include <vector>

#include "channel_act/channel_act.h"

namespace fastcnn {

FASTCNN_DECLARE_CHANNEL_ACT(cpu::DEFAULT)
FASTCNN_DECLARE_CHANNEL_ACT_DZ(cpu::DEFAULT)
#ifdef FASTCNN_CPU_AVX2
FASTCNN_DECLARE_CHANNEL_ACT(cpu::AVX2)
FASTCNN_DECLARE_CHANNEL_ACT_DZ(cpu::AVX2)
#endif

namespace cpu {

enum class Capability : int { kDefault = 0, kAvx2 = 1 };

// The kernels cpu::* run: the best one compiled in and supported by this CPU, as PyTorch
// decides it for its own kernels (at::get_cpu_capability(), which honours the environment
// variable ATEN_CPU_CAPABILITY=default), unless set_capability chose another.
Capability capability();
const char* capability_name(Capability c);
// "default", "avx2" or "auto"; an error for a capability not compiled in or not supported
void set_capability(const std::string& name);
// capabilities usable on this machine with this build, best last
std::vector<std::string> available_capabilities();

}  // namespace cpu
}  // namespace fastcnn
