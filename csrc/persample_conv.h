// Per-sample squared / absolute convolution weight-gradient statistics (persample_conv_sq_), C++ CPU
// kernel behind ewc_fast/ops/persample_conv/_cpp.py.
#pragma once
#include "common.h"

namespace ewcf {

// Registers ewc_fast._C.persample_conv_sq (see csrc/persample_conv.cpp for the argument list).
void init_persample_conv(py::module_& m);

}  // namespace ewcf
