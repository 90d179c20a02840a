// The AVX2-capability build of the CPU channel_act kernels (csrc/channel_act/cpu/channel_act_impl.h).
// setup.py compiles the files in any avx2/ folder under csrc/ with -mavx2 -mfma -mf16c and
// -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 (as ATen builds its own AVX2 kernels), links
// them last, and defines FASTCNN_CPU_AVX2 for the rest of the extension;
// csrc/channel_act/cpu/dispatch.cpp calls them only on CPUs with AVX2 and FMA.
#if !defined(CPU_CAPABILITY_AVX2) || !defined(__AVX2__) || !defined(__FMA__)
#error "csrc/**/avx2/*.cpp must be compiled with -mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 (see setup.py)"
#endif
#include "channel_act/cpu/channel_act_impl.h"
