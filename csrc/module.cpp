// ewc_fast._C: pybind11 entry point. Each op family's kernels live in csrc/<family>.cpp and register
// themselves through the init_<family> function declared in csrc/<family>.h.
#include "common.h"
#include "consolidation.h"
#include "fused_step.h"
#include "persample.h"
#include "persample_conv.h"

PYBIND11_MODULE(_C, m) {
    m.doc() = "ewc_fast C++ CPU kernels (OpenMP). Buffers arrive as raw pointers; the Python side validates.";
    m.def("openmp_max_threads", &ewcf::openmp_max_threads, "omp_get_max_threads() of this build (1 without OpenMP)");
    ewcf::init_consolidation(m);
    ewcf::init_fused_step(m);
    ewcf::init_persample(m);
    ewcf::init_persample_conv(m);
}
