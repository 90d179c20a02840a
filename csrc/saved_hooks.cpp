// The registered pack hook of fastcnn.recompute and the check against the thread's innermost
// saved-tensor hooks (see csrc/include/saved_hooks.h).
#include "include/saved_hooks.h"

#include <Python.h>

#include <atomic>

namespace fastcnn {
namespace {

std::atomic<PyObject*>& registered() {
  static std::atomic<PyObject*> pack{nullptr};
  return pack;
}

}  // namespace

// called from Python (the GIL held): the new hook gets a reference, the old one loses its own
void set_recompute_pack_hook(PyObject* pack) {
  Py_XINCREF(pack);
  PyObject* old = registered().exchange(pack);
  Py_XDECREF(old);
}

bool recompute_hooks_on_top() {
  PyObject* pack = registered().load(std::memory_order_relaxed);
  if (pack == nullptr) return false;
  const auto& tls = at::SavedTensorDefaultHooks::get_tls_state();
  if (tls.stack.empty() || tls.is_tracing) return false;
  const c10::SafePyObject& top = tls.stack.top().first;
  return top.ptr(&top.pyinterpreter()) == pack;
}

}  // namespace fastcnn
