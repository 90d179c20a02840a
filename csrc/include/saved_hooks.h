// Saving a tensor past fastcnn.recompute's own saved-tensor hooks where they would keep it as
// it is anyway.
//
// Inside a fused model's training forward, fastcnn.recompute pushes a pair of Python
// saved-tensor hooks, and autograd calls the pack hook for every tensor any node saves: three
// per conv+BN+activation layer (the convolution's input and weight, the BN input). The hook
// replaces a tensor by its rebuild recipe only where the tensor has one -- an earlier fused
// layer's output; everything else it keeps as (tensor, version), exactly what a SavedVariable
// without hooks keeps. A tensor a fused op has just created (the convolution output z, the
// op's own output) or a parameter can have no recipe, yet each cost a Python call from the
// engine on save and another on unpack, about a third of what the recipes cost a layer
// (bench/RESULTS.md). So the composite ops save those past the hooks -- only while the
// innermost hooks are fastcnn.recompute's own unobserved pack hook (registered at import:
// fastcnn._C._set_recompute_pack_hook); under anyone else's hooks (torch.utils.checkpoint,
// save_on_cpu, a user's), or while fastcnn.memory observes what the hooks keep, every tensor
// still goes through them.
//
// How: SavedVariable takes its hooks from at::SavedTensorDefaultHooks::get_hooks(), which
// returns none while the thread's hooks are in "tracing" state (what Dynamo uses to defer
// them); PastRecomputeHooks sets that state around one SavedVariable's construction.
#pragma once

#include <ATen/SavedTensorHooks.h>
#include <c10/util/python_stub.h>

namespace fastcnn {

// The pack hook fastcnn.recompute pushes (nullptr: none registered -- fastcnn.memory is
// observing, or recompute is not imported); the pointer is compared, never called.
void set_recompute_pack_hook(PyObject* pack);

// Whether the thread's innermost saved-tensor hooks are fastcnn.recompute's registered pack.
bool recompute_hooks_on_top();

// Constructs SavedVariables past the hooks while alive, when `past` (recompute_hooks_on_top()).
class PastRecomputeHooks {
 public:
  explicit PastRecomputeHooks(bool past) : past_(past) {
    if (past_) previous_ = at::SavedTensorDefaultHooks::set_tracing(true);
  }
  ~PastRecomputeHooks() {
    if (past_) at::SavedTensorDefaultHooks::set_tracing(previous_);
  }
  PastRecomputeHooks(const PastRecomputeHooks&) = delete;
  PastRecomputeHooks& operator=(const PastRecomputeHooks&) = delete;

 private:
  bool past_;
  bool previous_ = false;
};

}  // namespace fastcnn
