// Fused optimizer step (SGD / Adam / AdamW + EWC penalty + SI + WVA in one pass), C++ CPU multi-tensor
// kernel behind ewc_fast/ops/fused_step/_cpp.py.
#pragma once
#include "common.h"

namespace ewcf {

// Registers ewc_fast._C.fused_step (see csrc/fused_step.cpp for the argument list).
void init_fused_step(py::module_& m);

}  // namespace ewcf
