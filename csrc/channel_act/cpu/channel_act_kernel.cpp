// The DEFAULT-capability build of the CPU channel_act kernels (csrc/channel_act/cpu/channel_act_impl.h):
// compiled with the extension's ordinary flags, runs on any CPU.
#define CPU_CAPABILITY DEFAULT
#include "channel_act/cpu/channel_act_impl.h"
