// CUDA backend: registers the fused kernels (gru_kernels.cuh) for CUDA tensors.
// Launches go to the current stream under a device guard; nothing in the step loops
// synchronises with the host or allocates, so forward + backward can be graph-captured.
//
// Host code only, compiled by the host compiler: the kernels and their launch loops are
// compiled by nvcc in gru_cuda.cu, which thus parses no ATen or torch header (nvcc
// parses a file's host includes once per GPU architecture and once more for the host).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers only (gru_driver.cpp)
#ifndef AT_PER_OPERATOR_HEADERS
#define AT_PER_OPERATOR_HEADERS
#endif

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "gru_device_loops.h"

namespace gru_fused {
namespace {

// The kernels' shared memory is fixed by their tiles: at most rows_smem_bytes<double>(3),
// about 27 KB, within the 48 KB any CUDA GPU grants a block without opting in. Checked
// against what the device reports (an attribute query: no sync, fine during capture).
void check_shared_memory(c10::DeviceIndex device) {
  constexpr size_t needed = std::max(cuda::rows_smem_bytes<double>(3), cuda::cols_smem_bytes<double>());
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlock, device));
  TORCH_CHECK(needed <= static_cast<size_t>(limit), "gru_fused: the CUDA kernels need ", needed,
              " bytes of shared memory per block; device ", int(device), " allows ", limit);
}

void forward_loop_cuda(const ForwardLoopArgs& a) {
  check_shared_memory(a.gi.device().index());
  cuda::forward_loop_device(a, c10::cuda::getCurrentCUDAStream(a.gi.device().index()));
}

void backward_loop_cuda(const BackwardLoopArgs& a) {
  check_shared_memory(a.dG.device().index());
  cuda::backward_loop_device(a, c10::cuda::getCurrentCUDAStream(a.dG.device().index()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_cuda(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reset_after, bool reverse) {
  const c10::cuda::CUDAGuard guard(input.device());
  return gru_forward_impl(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                          reset_after, reverse, &forward_loop_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                  const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
                  const at::Tensor& weight_hh, const at::Tensor& output,
                  const at::Tensor& workspace, const std::optional<at::Tensor>& lengths,
                 bool has_bias, bool reset_after, bool reverse,
                  std::array<bool, 6> output_mask) {
  const c10::cuda::CUDAGuard guard(input.device());
  return gru_backward_impl(grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output,
                           workspace, lengths, has_bias, reset_after, reverse, output_mask,
                           &backward_loop_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(gru_fused, CUDA, m) {
  m.impl("gru_forward", &gru_forward_cuda);
  m.impl("gru_backward", &gru_backward_cuda);
}

}  // namespace gru_fused
