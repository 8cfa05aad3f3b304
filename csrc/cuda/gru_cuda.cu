// CUDA backend, device side: the kernels (gru_kernels.cuh) and their launch loops,
// compiled by nvcc for every dtype that gru_device_loops.h dispatches to; the host code
// that calls them, and the op registration, is gru_cuda_ops.cpp. This file includes
// nothing from ATen or torch beyond the dtypes: nvcc parses a file's host includes once
// per GPU architecture and once more for the host.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/gru_kernels.cuh"

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

GRU_FUSED_INSTANTIATE(double)
GRU_FUSED_INSTANTIATE(float)
GRU_FUSED_INSTANTIATE(c10::Half)
GRU_FUSED_INSTANTIATE(c10::BFloat16)

#undef GRU_FUSED_INSTANTIATE

}  // namespace cuda
}  // namespace gru_fused
