// The CUDA backend's step loops on ATen tensors: dtype dispatch, the kernels' parameter
// structs, and the launches. Shared by gru_cuda_ops.cpp (the GPU) and by the emulation
// test extension (g++ with GRU_EMULATE_CUDA, the CPU), so the tests run this exact code.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>

#include <type_traits>

#include "gru.h"
#if defined(__CUDACC__) || defined(GRU_EMULATE_CUDA)
#include "cuda/gru_persistent.cuh"  // the kernels and launch loops, compiled along
#else
// The host compiler, for the GPU: the launch loops are declared here and compiled by
// nvcc, for every dtype dispatched below, in gru_cuda.cu.
#include "cuda/gru_kernel_params.h"
#endif

namespace gru_fused {
namespace cuda {

inline void check_launchable(int64_t T, int64_t B, int64_t H) {
  constexpr int64_t kMaxInt = 2147483647;
  TORCH_CHECK(T <= kMaxInt && H <= kMaxInt / 3, "gru_fused: T and 3H must fit in int32");
  // The grid's y dimension (at most 65535) counts tiles of rows; the smallest has 4.
  constexpr int64_t kMaxB = int64_t(65535) * OneGateTile::kRows;
  TORCH_CHECK(B <= kMaxB, "gru_fused (CUDA): batch size ", B,
              " exceeds the kernels' grid limit of ", kMaxB);
}

// Runs the persistent kernel the plan picks for this device with `launch(plan)` (false:
// the device refused it); false if none ran, and the caller runs the step kernels. A
// refused cluster plan (e.g. 16 CTAs, non-portable, on a GPU whose GPCs cannot hold
// enough of them) is planned again with clusters half as wide; it ends, as they shrink.
template <typename Launch>
bool run_persistent(DeviceProps d, Direction dir, size_t scalar_bytes, size_t acc_bytes,
                    int64_t H, int64_t B, bool reset_after, const Launch& launch) {
  const Choice choice = choice_from_env();
  for (;;) {
    const Plan plan = plan_kernel(d, dir, scalar_bytes, acc_bytes, H, B, reset_after, choice);
    if (plan.family == Family::kStep) return false;
    if (launch(plan)) return true;
    if (plan.family != Family::kCluster) return false;
    d.max_cluster = plan.shape.cluster / 2;
  }
}

// One loop (forward or backward) of a call: a persistent kernel, or the step kernels
// (float64, no plan, or a launch the device refused).
template <typename scalar_t, typename acc_t, bool kResetAfter>
void run_forward(const ForwardParams<scalar_t>& p, const DeviceProps& d, gru_stream_t stream) {
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (run_persistent(d, Direction::kForward, sizeof(scalar_t), sizeof(acc_t), p.H, p.B,
                       kResetAfter, [&](const Plan& plan) {
                         return forward_persistent<scalar_t, acc_t, kResetAfter>(p, plan, stream);
                       })) {
      return;
    }
  }
  forward_steps<scalar_t, acc_t, kResetAfter>(p, stream);
}

template <typename scalar_t, typename acc_t, bool kResetAfter>
void run_backward(const BackwardParams<scalar_t, acc_t>& p, const DeviceProps& d,
                  gru_stream_t stream) {
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (run_persistent(d, Direction::kBackward, sizeof(scalar_t), sizeof(acc_t), p.H, p.B,
                       kResetAfter, [&](const Plan& plan) {
                         return backward_persistent<scalar_t, acc_t, kResetAfter>(p, plan, stream);
                       })) {
      return;
    }
  }
  backward_steps<scalar_t, acc_t, kResetAfter>(p, stream);
}

inline void forward_loop_device(const ForwardLoopArgs& a, const DeviceProps& device,
                                gru_stream_t stream) {
  // The kernels read gi [T, B, 3H] directly; the one-hot row gather is the CPU's alone.
  TORCH_INTERNAL_ASSERT(!a.gi_rows.defined(), "gru_fused: no one-hot path on this backend");
  const int64_t T = a.gi.size(0), B = a.gi.size(1), H = a.hx.size(1);
  check_launchable(T, B, H);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.gi.scalar_type(),
                                  "gru_fused_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardParams<scalar_t> p;
    p.gi = a.gi.data_ptr<scalar_t>();
    p.hx = a.hx.data_ptr<scalar_t>();
    p.w_hh = a.weight_hh.data_ptr<scalar_t>();
    p.b_hn = a.b_hn.defined() ? a.b_hn.data_ptr<scalar_t>() : nullptr;
    p.lengths = a.lengths.defined() ? a.lengths.data_ptr<int64_t>() : nullptr;
    p.output = a.output.data_ptr<scalar_t>();
    p.workspace = a.workspace.data_ptr<scalar_t>();
    p.T = static_cast<int>(T);
    p.B = static_cast<int>(B);
    p.H = static_cast<int>(H);
    p.ws_steps = static_cast<int>(a.workspace.size(1));  // T, or 1 for gru_inference
    p.reverse = a.reverse;
    if (a.reset_after) run_forward<scalar_t, acc_t, true>(p, device, stream);
    else run_forward<scalar_t, acc_t, false>(p, device, stream);
  });
}

inline void backward_loop_device(const BackwardLoopArgs& a, const DeviceProps& device,
                                 gru_stream_t stream) {
  const int64_t T = a.output.size(0), B = a.output.size(1), H = a.output.size(2);
  check_launchable(T, B, H);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dG.scalar_type(),
                                  "gru_fused_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // dL/dh_prev's direct share, carried from step to step in acc_t; allocated once here.
    at::Tensor dh_direct = at::empty({B, H}, a.dG.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    // [H, 3H]: the backward's matmuls read W_hh by columns; transposed, by rows (a
    // fresh copy, or weight_hh itself when that is already W_hh^T's storage: only read).
    const at::Tensor w_hh_t = a.weight_hh.t().contiguous();
    BackwardParams<scalar_t, acc_t> p;
    p.grad_output = a.grad_output.data_ptr<scalar_t>();
    p.grad_h_n = a.grad_h_n.data_ptr<scalar_t>();
    p.hx = a.hx.data_ptr<scalar_t>();
    p.w_hh_t = w_hh_t.data_ptr<scalar_t>();
    p.output = a.output.data_ptr<scalar_t>();
    p.workspace = a.workspace.data_ptr<scalar_t>();
    p.dG = a.dG.data_ptr<scalar_t>();
    p.dGh = a.dGh.data_ptr<scalar_t>();
    p.dh_direct = dh_direct.data_ptr<acc_t>();
    p.grad_hx = a.grad_hx.data_ptr<scalar_t>();
    p.T = static_cast<int>(T);
    p.B = static_cast<int>(B);
    p.H = static_cast<int>(H);
    p.reverse = a.reverse;
    if (a.reset_after) run_backward<scalar_t, acc_t, true>(p, device, stream);
    else run_backward<scalar_t, acc_t, false>(p, device, stream);
  });
}

}  // namespace cuda
}  // namespace gru_fused
