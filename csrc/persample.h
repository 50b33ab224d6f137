// Per-sample squared / absolute Linear weight-gradient statistics (persample_sq_), C++ CPU kernel
// behind ewc_fast/ops/persample/_cpp.py.
#pragma once
#include "common.h"

namespace ewcf {

// Registers ewc_fast._C.persample_sq and persample_isa (see csrc/persample.cpp for the argument list).
void init_persample(py::module_& m);

}  // namespace ewcf
