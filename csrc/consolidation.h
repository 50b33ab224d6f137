// Consolidation kernels (penalty_apply, consolidate, si_accumulate, si_consolidate, wva_attenuate),
// C++ CPU multi-tensor kernels behind ewc_fast/ops/consolidation/_cpp.py.
#pragma once
#include "common.h"

namespace ewcf {

// Registers ewc_fast._C.penalty_apply, consolidate, si_accumulate, si_consolidate, wva_attenuate and
// the bf16/fp16 conversion test hooks (see csrc/consolidation.cpp for the argument lists).
void init_consolidation(py::module_& m);

}  // namespace ewcf
