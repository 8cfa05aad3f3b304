// The CUDA kernels' block tiles and shared memory sizes: plain constants, no CUDA header,
// so that the persistent kernels' planner (gru_persistent_plan.h) and the Python module
// (ops.cpp) read them in any build.
#pragma once

#include <cstddef>

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

}  // namespace cuda
}  // namespace gru_fused
