// Direct Python entry points to the composite layer ops and the rebuild primitives: one
// pybind11 function per op that calls the op's typed dispatcher handle, as
// `fastcnn._C.call_<op>(...)`.
//
// Why: a `torch.ops.fastcnn.<op>.default(...)` call from Python goes through the JIT's generic
// boxed path -- the __torch_function__ scan of every argument, each argument converted to an
// IValue against the schema (int[2] lists included), a boxed dispatcher call that unboxes
// them again, the outputs boxed back. Counted with valgrind (bench/host_instructions.py, CPU,
// 2x8x4x4): about 40,000 instructions per conv_bn_act call above the op itself, a tenth of a
// fused layer's whole eval call -- more than ATen's generated bindings spend on each of
// eager's conv2d / batch_norm / relu. Here the arguments are converted once by pybind11's
// casters (torch's own for Tensor and int lists) and the op is called unboxed; the dispatcher
// still runs every dispatch key, so autograd, autocast, fake tensors and functionalization
// see exactly the same op.
//
// What these skip is only the __torch_function__ protocol: fastcnn/ops/extension_backend.py
// calls them when no argument overrides it and no TorchFunctionMode is active (one
// `torch._C._has_torch_function` check, as torch.nn.functional does), and the torch.ops path
// otherwise. The GIL is released around the op, as ATen's bindings do (a saved-tensor hook or
// a fake implementation that needs Python takes it back).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <string_view>

#include "include/layer_op.h"
#include "include/python_calls.h"

namespace fastcnn {
namespace {

using IntList = c10::IntArrayRef;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

FASTCNN_OP_HANDLE(op_bn_act, "fastcnn::bn_act",
                  Tensors3(const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&, const OptT&, bool,
                           double, double, c10::string_view, double))
FASTCNN_OP_HANDLE(op_conv_bn_act, "fastcnn::conv_bn_act",
                  Tensors4(const Tensor&, const Tensor&, const OptT&, const Tensor&, const Tensor&, const OptT&,
                           const OptT&, const OptT&, IntList, IntList, IntList, int64_t, bool, double, double,
                           c10::string_view, double))
FASTCNN_OP_HANDLE(op_conv_act, "fastcnn::conv_act",
                  Tensors2(const Tensor&, const Tensor&, const OptT&, const OptT&, IntList, IntList, IntList, int64_t,
                           c10::string_view, double))
FASTCNN_OP_HANDLE(op_bn_act_conv, "fastcnn::bn_act_conv",
                  Tensor(const Tensor&, const Tensor&, const Tensor&, const OptT&, const OptT&, const Tensor&,
                         const OptT&, const OptT&, IntList, IntList, IntList, int64_t, bool, double, double,
                         c10::string_view, double, bool))
FASTCNN_OP_HANDLE(op_se_block, "fastcnn::se_block",
                  Tensor(const Tensor&, const Tensor&, const OptT&, const Tensor&, const OptT&, const OptT&,
                         c10::string_view, double))

using Release = pybind11::call_guard<pybind11::gil_scoped_release>;

}  // namespace

void register_python_calls(pybind11::module& m) {
  m.def(
      "call_bn_act",
      [](const Tensor& x, const Tensor& weight, const Tensor& bias, const OptT& running_mean, const OptT& running_var,
         const OptT& residual, bool training, double momentum, double eps, std::string_view act, double act_param) {
        return op_bn_act().call(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, act,
                                act_param);
      },
      Release(), "torch.ops.fastcnn.bn_act.default without the __torch_function__ protocol");
  m.def(
      "call_conv_bn_act",
      [](const Tensor& x, const Tensor& weight, const OptT& bias, const Tensor& bn_weight, const Tensor& bn_bias,
         const OptT& running_mean, const OptT& running_var, const OptT& residual, IntList stride, IntList padding,
         IntList dilation, int64_t groups, bool training, double momentum, double eps, std::string_view act,
         double act_param) {
        return op_conv_bn_act().call(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride,
                                     padding, dilation, groups, training, momentum, eps, act, act_param);
      },
      Release(), "torch.ops.fastcnn.conv_bn_act.default without the __torch_function__ protocol");
  m.def(
      "call_conv_act",
      [](const Tensor& x, const Tensor& weight, const OptT& bias, const OptT& residual, IntList stride,
         IntList padding, IntList dilation, int64_t groups, std::string_view act, double act_param) {
        return op_conv_act().call(x, weight, bias, residual, stride, padding, dilation, groups, act, act_param);
      },
      Release(), "torch.ops.fastcnn.conv_act.default without the __torch_function__ protocol");
  m.def(
      "call_bn_act_conv",
      [](const Tensor& x, const Tensor& bn_weight, const Tensor& bn_bias, const OptT& running_mean,
         const OptT& running_var, const Tensor& weight, const OptT& bias, const OptT& residual, IntList stride,
         IntList padding, IntList dilation, int64_t groups, bool training, double momentum, double eps,
         std::string_view act, double act_param, bool rebuild) {
        return op_bn_act_conv().call(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, residual,
                                     stride, padding, dilation, groups, training, momentum, eps, act, act_param,
                                     rebuild);
      },
      Release(), "torch.ops.fastcnn.bn_act_conv.default without the __torch_function__ protocol");
  m.def(
      "call_se_block",
      [](const Tensor& x, const Tensor& fc1_weight, const OptT& fc1_bias, const Tensor& fc2_weight,
         const OptT& fc2_bias, const OptT& residual, std::string_view act, double act_param) {
        return op_se_block().call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, act, act_param);
      },
      Release(), "torch.ops.fastcnn.se_block.default without the __torch_function__ protocol");
  // the rebuilds of fastcnn.recompute (run in backward, where no mode of the forward applies)
  m.def(
      "call_bn_act_apply",
      [](const Tensor& x, const Tensor& weight, const Tensor& bias, const OptT& residual, const Tensor& mean,
         const Tensor& var, double eps, std::string_view act, double act_param) {
        return op_bn_act_apply().call(x, weight, bias, residual, mean, var, eps, act, act_param);
      },
      Release(), "torch.ops.fastcnn.bn_act_apply.default without the __torch_function__ protocol");
  m.def(
      "call_scale_shift_act",
      [](const Tensor& x, const OptT& scale, const OptT& shift, const OptT& residual, std::string_view act,
         double act_param) { return op_scale_shift_act().call(x, scale, shift, residual, act, act_param); },
      Release(), "torch.ops.fastcnn.scale_shift_act.default without the __torch_function__ protocol");
  m.def(
      "call_se_block_forward",
      [](const Tensor& x, const Tensor& fc1_weight, const OptT& fc1_bias, const Tensor& fc2_weight,
         const OptT& fc2_bias, const OptT& residual, std::string_view act, double act_param) {
        return op_se_block_forward().call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, act, act_param);
      },
      Release(), "torch.ops.fastcnn.se_block_forward.default without the __torch_function__ protocol");
}

}  // namespace fastcnn
