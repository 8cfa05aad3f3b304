// Test-only extension: the CUDA backend's step loops (csrc/cuda/gru_device_loops.h, the very
// kernels nvcc compiles) run on CPU tensors through the emulation layer, registered as
// torch.ops.gru_fused_emu.gru_forward / gru_inference / gru_backward with the schemas of
// gru_fused's ops,
// and torch.ops.gru_fused_emu.set_seed(seed): the seed of the emulator's block and thread
// order for the launches that follow (a negative seed: back to GRU_EMU_SEED or the
// default), torch.ops.gru_fused_emu.launch_count(kernel) and reset_launch_counts(): which
// kernels ran. Built by tests/test_emulation.py with -DGRU_EMULATE_CUDA.
#ifndef GRU_EMULATE_CUDA
#error "build with -DGRU_EMULATE_CUDA"
#endif
#include <torch/library.h>

#include "cuda/gru_device_loops.h"
#include "schemas.h"

namespace gru_fused {
namespace {

// The emulated device (GRU_EMU_CC, GRU_EMU_SM_COUNT: an sm_90 with 16 SMs by default)
// and GRU_FUSED_CUDA_KERNEL pick the kernels, as a GPU's properties would.
void forward_loop_emu(const ForwardLoopArgs& a) {
  cuda::forward_loop_device(a, gru_emu::device_props<cuda::DeviceProps>(), nullptr);
}
void backward_loop_emu(const BackwardLoopArgs& a) {
  cuda::backward_loop_device(a, gru_emu::device_props<cuda::DeviceProps>(), nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reset_after, bool reverse) {
  return gru_forward_impl(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                          reset_after, reverse, &forward_loop_emu);
}

// gru_inference as the CUDA backend registers it: the kernels keep one step's workspace
// slots (ForwardParams::ws_steps = 1).
std::tuple<at::Tensor, at::Tensor> inference(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reset_after, bool reverse) {
  auto [output, h_n, workspace] =
      gru_forward_impl(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reset_after,
                       reverse, &forward_loop_emu, {}, /*keep_workspace=*/false);
  return {output, h_n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& output, const at::Tensor& workspace, const std::optional<at::Tensor>& lengths,
                 bool has_bias, bool reset_after,
    bool reverse, std::array<bool, 6> output_mask) {
  return gru_backward_impl(grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output,
                           workspace, lengths, has_bias, reset_after, reverse, output_mask,
                           &backward_loop_emu);
}

void set_seed(int64_t seed) {
  if (seed < 0) gru_emu::clear_seed();
  else gru_emu::set_seed(static_cast<uint64_t>(seed));
}

// Launches that ran since the last reset, of the kernel named as at its launch site
// (forward_step, backward_step, backward_reset, backward_final, forward_cluster,
// backward_cluster, forward_cooperative, backward_cooperative).
int64_t launch_count(c10::string_view kernel) {
  const auto counts = gru_emu::launch_counts();
  const auto it = counts.find(std::string(kernel));
  return it == counts.end() ? 0 : static_cast<int64_t>(it->second);
}

// The cluster size of the last launch of that kernel (1: no clusters; 0: none ran).
int64_t last_cluster_size(c10::string_view kernel) {
  return gru_emu::last_cluster_size(std::string(kernel));
}

}  // namespace

TORCH_LIBRARY(gru_fused_emu, m) {
  m.def(kForwardSchema);
  m.def(kInferenceSchema);
  m.def(kBackwardSchema);
  m.def("set_seed(int seed) -> ()", &set_seed);
  m.def("launch_count(str kernel) -> int", &launch_count);
  m.def("last_cluster_size(str kernel) -> int", &last_cluster_size);
  m.def("reset_launch_counts() -> ()", [] { gru_emu::reset_launch_counts(); });
}

TORCH_LIBRARY_IMPL(gru_fused_emu, CPU, m) {
  m.impl("gru_forward", &forward);
  m.impl("gru_inference", &inference);
  m.impl("gru_backward", &backward);
}

}  // namespace gru_fused
