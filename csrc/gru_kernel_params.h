// The CUDA kernels' interface: tile sizes, parameter structs, shared memory sizes, and
// the two launch loops, declared. Their definitions (gru_kernels.cuh) are compiled by
// nvcc in gru_cuda.cu, or by g++ through the emulation layer in the tests; the host
// code that calls them (gru_device_loops.h, in gru_cuda_ops.cpp) needs only this file.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_compat.h"

namespace gru_fused {
namespace cuda {

constexpr int kTileJ = 32;  // hidden units per block: threadIdx.x
constexpr int kTileB = 8;   // batch rows per block: threadIdx.y
constexpr int kTileK = 32;  // reduction slice per shared-memory stage
constexpr int kThreads = kTileJ * kTileB;
static_assert(kTileK == kTileJ, "the A tile is loaded with threadIdx.x along k");

// Pointers, strides and sizes of one forward call. All tensors contiguous.
template <typename scalar_t>
struct ForwardParams {
  const scalar_t* gi;      // [T, B, 3H] x W_ih^T + folded biases
  const scalar_t* hx;      // [B, H]
  const scalar_t* w_hh;    // [3H, H]
  const scalar_t* b_hn;    // [H], or nullptr (reset_before folds b_hn into gi)
  const int64_t* lengths;  // [B], or nullptr when every sequence has T steps
  scalar_t* output;        // [T, B, H]
  scalar_t* workspace;     // [4, T, B, H] slots r, z, n, hn (gru_math.h)
  int T, B, H;
  bool reverse;
};

template <typename scalar_t, typename acc_t>
struct BackwardParams {
  const scalar_t* grad_output;  // [T, B, H]
  const scalar_t* grad_h_n;     // [B, H]
  const scalar_t* hx;           // [B, H]
  const scalar_t* w_hh;         // [3H, H]
  const scalar_t* output;       // [T, B, H]
  const scalar_t* workspace;    // [4, T, B, H]
  scalar_t* dG;                 // [T, B, 3H] dL/dgi
  scalar_t* dGh;                // [T, B, 3H] dL/dgh; aliases dG when reset_before
  acc_t* dh_direct;             // [B, H] dL/dh_prev minus the recurrent GEMM's share
  scalar_t* grad_hx;            // [B, H]
  int T, B, H;
  bool reverse;
};

template <typename acc_t>
constexpr size_t rows_smem_bytes(int gates) {
  return sizeof(acc_t) * (kTileB * kTileK + gates * kTileJ * (kTileK + 1));
}

template <typename acc_t>
constexpr size_t cols_smem_bytes() {
  return sizeof(acc_t) * (kTileB * kTileK + kTileK * kTileJ);
}

// The forward step loop: T launches (2T for reset_before) on one stream, no host sync.
template <typename scalar_t, typename acc_t, bool kResetAfter>
void forward_steps(const ForwardParams<scalar_t>& p, gru_stream_t stream);

// The backward step loop: T launches (2T for reset_before) plus one for grad_hx.
template <typename scalar_t, typename acc_t, bool kResetAfter>
void backward_steps(const BackwardParams<scalar_t, acc_t>& p, gru_stream_t stream);

}  // namespace cuda
}  // namespace gru_fused
