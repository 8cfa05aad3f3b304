// CUDA backend, device side: the kernels (gru_kernels.cuh, gru_persistent.cuh) and their
// launch loops, compiled by nvcc for every dtype that gru_device_loops.h dispatches to;
// the host code that calls them, and the op registration, is gru_cuda_ops.cpp. This file includes
// nothing from ATen or torch beyond the dtypes: nvcc parses a file's host includes once
// per GPU architecture and once more for the host.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/gru_persistent.cuh"

namespace gru_fused {
namespace cuda {

// scalar_t as AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16) names it, accumulating
// in at::opmath_type<scalar_t> (float for half and bfloat16), both formulas.
#define GRU_FUSED_INSTANTIATE(scalar_t)                                                        \
  template void forward_steps<scalar_t, at::opmath_type<scalar_t>, true>(                      \
      const ForwardParams<scalar_t>&, gru_stream_t);                                           \
  template void forward_steps<scalar_t, at::opmath_type<scalar_t>, false>(                     \
      const ForwardParams<scalar_t>&, gru_stream_t);                                           \
  template void backward_steps<scalar_t, at::opmath_type<scalar_t>, true>(                     \
      const BackwardParams<scalar_t, at::opmath_type<scalar_t>>&, gru_stream_t);               \
  template void backward_steps<scalar_t, at::opmath_type<scalar_t>, false>(                    \
      const BackwardParams<scalar_t, at::opmath_type<scalar_t>>&, gru_stream_t);

// The persistent kernels, for the dtypes the planner gives them (float64 stays on the
// step kernels: gru_persistent_plan.h).
#define GRU_FUSED_INSTANTIATE_PERSISTENT(scalar_t)                                             \
  template bool forward_persistent<scalar_t, at::opmath_type<scalar_t>, true>(                 \
      const ForwardParams<scalar_t>&, const Plan&, gru_stream_t);                              \
  template bool forward_persistent<scalar_t, at::opmath_type<scalar_t>, false>(                \
      const ForwardParams<scalar_t>&, const Plan&, gru_stream_t);                              \
  template bool backward_persistent<scalar_t, at::opmath_type<scalar_t>, true>(                \
      const BackwardParams<scalar_t, at::opmath_type<scalar_t>>&, const Plan&, gru_stream_t);  \
  template bool backward_persistent<scalar_t, at::opmath_type<scalar_t>, false>(               \
      const BackwardParams<scalar_t, at::opmath_type<scalar_t>>&, const Plan&, gru_stream_t);

GRU_FUSED_INSTANTIATE(double)
GRU_FUSED_INSTANTIATE(float)
GRU_FUSED_INSTANTIATE(c10::Half)
GRU_FUSED_INSTANTIATE(c10::BFloat16)
GRU_FUSED_INSTANTIATE_PERSISTENT(float)
GRU_FUSED_INSTANTIATE_PERSISTENT(c10::Half)
GRU_FUSED_INSTANTIATE_PERSISTENT(c10::BFloat16)

#undef GRU_FUSED_INSTANTIATE
#undef GRU_FUSED_INSTANTIATE_PERSISTENT

}  // namespace cuda
}  // namespace gru_fused
