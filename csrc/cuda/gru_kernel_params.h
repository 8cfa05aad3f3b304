// The CUDA kernels' interface: block tiles, parameter structs, shared memory sizes, and
// the two launch loops, declared. Their definitions (gru_kernels.cuh) are compiled by
// nvcc in gru_cuda.cu, or by g++ through the emulation layer in the tests; the host
// code that calls them (gru_device_loops.h, in gru_cuda_ops.cpp) needs only this file.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/cuda_compat.h"

namespace gru_fused {
namespace cuda {

// Every step kernel is one block shape: kWarps warps of kLanes threads. A block owns a
// tile of hidden units x batch rows; warp w owns units [j0 + w U, j0 + (w + 1) U) of
// every row of the tile, and its lanes split the reduction dimension k (lane l takes
// k = l, l + 32, ...), so a warp's weight loads are 32 consecutive elements of a row.
constexpr int kLanes = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kLanes * kWarps;
// Registers for two blocks per SM (at most 128 per thread): large shapes have more
// blocks than SMs, and a second block's loads cover the first one's barriers.
constexpr int kMinBlocksPerSm = 2;

// One kernel's block tile. A thread accumulates kGates x kUnitsPerWarp weight rows
// (gates of its warp's units) times kRows batch rows: kOutputs independent FMA chains,
// reading kRows shared values per k for kGates * kUnitsPerWarp * kRows FMAs. The
// reduction is staged kChunk values at a time, kKPerLane per lane: each chunk is one
// round of memory latency, so kernels with few FMAs per k take longer chunks.
template <int kGates_, int kUnitsPerWarp_, int kRows_, int kKPerLane_>
struct Tile {
  static constexpr int kGates = kGates_;
  static constexpr int kUnitsPerWarp = kUnitsPerWarp_;
  static constexpr int kRows = kRows_;
  static constexpr int kKPerLane = kKPerLane_;
  static constexpr int kChunk = kLanes * kKPerLane;
  static constexpr int kUnits = kWarps * kUnitsPerWarp;                 // per block
  static constexpr int kWeightRows = kGates * kUnitsPerWarp;            // per thread
  static constexpr int kOutputs = kWeightRows * kRows;                  // per thread
  static_assert(kUnitsPerWarp * kRows <= kLanes, "one lane per (unit, row) sums the gates");
  static_assert(kRows * kChunk % kThreads == 0, "the A tile splits evenly over the block");

  // Shared memory: the double-buffered A tile [2][kRows][kChunk], then (reusing it) the
  // partial sums [kWarps][kOutputs][kLanes + 1] (padded: a lane's writes and a reducer's
  // reads hit distinct banks).
  template <typename acc_t>
  static constexpr size_t smem_bytes() {
    constexpr size_t a = 2 * kRows * kChunk, partials = kWarps * kOutputs * (kLanes + 1);
    return sizeof(acc_t) * (a > partials ? a : partials);
  }
};

// The tiles. Three gates per thread in the forward's fused step (one shared load per
// three FMAs); two units per warp where a kernel has one gate. Fewer rows when the
// partial sums are doubles (within 48 KB), and in the one-gate kernels (more blocks at
// small batch).
template <typename acc_t>
using ForwardFusedTile = Tile<3, 1, (sizeof(acc_t) > 4 ? 4 : 8), 4>;  // gh_r, gh_z, gh_n
template <typename acc_t>
using ForwardResetTile = Tile<2, 1, (sizeof(acc_t) > 4 ? 4 : 8), 4>;  // gh_r, gh_z
using OneGateTile = Tile<1, 2, 4, 8>;  // the candidate's (r h) W_hn^T; every backward matmul

// The most any kernel asks for, checked against the device (gru_cuda_ops.cpp) and, in
// emulation, against the 48 KB a block gets without opting in.
constexpr size_t kMaxSmemBytes = ForwardFusedTile<double>::smem_bytes<double>();
static_assert(kMaxSmemBytes <= 48 * 1024, "the step kernels fit the default 48 KB");

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

}  // namespace cuda
}  // namespace gru_fused
