// Direct Python entry points to the composite ops (csrc/python_calls.cpp), registered on the
// extension module by csrc/fastcnn.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace fastcnn {

void register_python_calls(pybind11::module& m);

}  // namespace fastcnn
