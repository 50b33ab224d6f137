// Consolidation kernels (penalty_apply, consolidate, si_accumulate, si_consolidate, wva_attenuate).
#include "common.h"

namespace ewcf {
void init_consolidation(py::module_& m) { (void)m; }
}  // namespace ewcf
