// Shared helpers for the ewc_fast C++ kernels: dtype codes, bf16/fp16 conversion, OpenMP shim.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace ewcf {

// dtype codes shared with ewc_fast/_cpp.py
enum DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

inline int openmp_max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void init_consolidation(py::module_& m);

}  // namespace ewcf
