// The CUDA kernels' interface: parameter structs and the launch loops, declared (the
// block tiles are gru_tiles.h, the persistent kernels' plans gru_persistent_plan.h).
// Their definitions (gru_kernels.cuh, gru_persistent.cuh) are compiled by nvcc in
// gru_cuda.cu, or by g++ through the emulation layer in the tests; the host code that
// calls them (gru_device_loops.h, in gru_cuda_ops.cpp) needs only this file.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/cuda_compat.h"
#include "cuda/gru_persistent_plan.h"
#include "cuda/gru_tiles.h"

namespace gru_fused {
namespace cuda {

// Pointers, strides and sizes of one forward call. All tensors contiguous.
template <typename scalar_t>
struct ForwardParams {
  const scalar_t* gi;      // [T, B, 3H] x W_ih^T + folded biases
  const scalar_t* hx;      // [B, H]
  const scalar_t* w_hh;    // [3H, H]
  const scalar_t* b_hn;    // [H], or nullptr (reset_before folds b_hn into gi)
  const int64_t* lengths;  // [B] on the device, or nullptr when every sequence has T steps
  scalar_t* output;        // [T, B, H]
  scalar_t* workspace;     // [4, ws_steps, B, H] slots r, z, n, hn (gru_math.h)
  int T, B, H;
  int ws_steps;            // T; or 1 (gru_inference): every step reuses one slot set
  bool reverse;
};

template <typename scalar_t, typename acc_t>
struct BackwardParams {
  const scalar_t* grad_output;  // [T, B, H]
  const scalar_t* grad_h_n;     // [B, H]
  const scalar_t* hx;           // [B, H]
  const scalar_t* w_hh_t;       // [H, 3H] W_hh^T: the backward's matmuls read W_hh by columns
  const scalar_t* output;       // [T, B, H]
  const scalar_t* workspace;    // [4, T, B, H]
  scalar_t* dG;                 // [T, B, 3H] dL/dgi
  scalar_t* dGh;                // [T, B, 3H] dL/dgh; aliases dG when reset_before
  acc_t* dh_direct;             // [B, H] dL/dh_prev minus the recurrent GEMM's share
  scalar_t* grad_hx;            // [B, H]
  int T, B, H;
  bool reverse;
};

// The forward step loop: T launches (2T for reset_before) on one stream, no host sync.
template <typename scalar_t, typename acc_t, bool kResetAfter>
void forward_steps(const ForwardParams<scalar_t>& p, gru_stream_t stream);

// The backward step loop: T launches (2T for reset_before) plus one for grad_hx.
template <typename scalar_t, typename acc_t, bool kResetAfter>
void backward_steps(const BackwardParams<scalar_t, acc_t>& p, gru_stream_t stream);

// The persistent kernels (gru_persistent.cuh): one launch for the whole sequence, as the
// plan says (cluster or cooperative). False when the device refused the launch (its
// blocks cannot be co-resident): nothing ran, and the caller runs the step loop.
template <typename scalar_t, typename acc_t, bool kResetAfter>
bool forward_persistent(const ForwardParams<scalar_t>& p, const Plan& plan, gru_stream_t stream);

template <typename scalar_t, typename acc_t, bool kResetAfter>
bool backward_persistent(const BackwardParams<scalar_t, acc_t>& p, const Plan& plan,
                         gru_stream_t stream);

// What the planner reads of CUDA device `device`: attribute queries (no sync, fine during
// capture), made once per device (gru_cuda_ops.cpp; the CUDA build only).
const DeviceProps& device_props(int device);

}  // namespace cuda
}  // namespace gru_fused
