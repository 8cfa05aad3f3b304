// Persistent CUDA kernels: one launch per call (a layer and direction) for the whole
// sequence, W_hh held in shared memory from the first step to the last. Which one runs,
// and its geometry, is gru_persistent_plan.h's decision.
//
// Each CTA owns `units` hidden units: it loads their W_hh rows (forward, [3][units][H])
// or W_hh^T rows (backward, [units][3H]) into shared memory once, then runs every step
// of the sequence, looping over the same tiles and tile bodies as the step kernels
// (forward_tile, backward_tile in gru_kernels.cuh, so both families compute the same
// bits). Between steps, what the next step's matmul reads from every unit:
//
//   cluster (sm_90)  the grid is clusters of C CTAs along x; cluster y owns batch rows
//                    [y rows, (y + 1) rows). A finished state h (backward: the gate
//                    gradients of the step) is written into that row's buffer in all C
//                    CTAs' shared memory (DSMEM), and one cluster barrier ends the step
//                    (two for reset_before, whose r h is exchanged the same way). The
//                    exchange buffers alternate between even and odd steps, so one
//                    barrier per exchange suffices: a CTA writes step i + 1's buffer
//                    while a slower peer may still read step i's. No grid-wide barrier;
//                    clusters never wait for each other.
//   cooperative      one CTA per SM at most, all batch rows; the state goes through global
//                    memory (the output, as for the step kernels) and a grid barrier
//                    ends each step.
//
// Both are deterministic (fixed tile order and reduction order, no atomics) and
// launched on the caller's stream without a host synchronisation (graph-capturable).
// A launch the device refuses (cluster or grid not co-resident) returns false and the
// caller runs the step kernels instead: they never wait for blocks that cannot run.
#pragma once

#include <type_traits>

#include "cuda/gru_kernels.cuh"
#include "cuda/gru_persistent_plan.h"

namespace gru_fused {
namespace cuda {

// The cluster exchange: value v at (row b, column col) of a [rows, ld] buffer, the same
// offset in every CTA of the cluster (this one included).
template <typename scalar_t>
struct ClusterExchange {
  scalar_t* buf;  // this CTA's copy
  int64_t ld;
  unsigned ctas;
  __device__ __forceinline__ void operator()(int b, int64_t col, scalar_t v) const {
#ifdef GRU_FAULT_DSMEM_RANK  // emulator self-test only: one rank past the cluster
    for (unsigned rank = 0; rank <= ctas; ++rank) {
#else
    for (unsigned rank = 0; rank < ctas; ++rank) {
#endif
      gru_map_shared_rank(buf, rank)[b * ld + col] = v;
    }
  }
};

// Where a persistent CTA stands: its units and batch rows, and its shared memory.
template <typename scalar_t, typename acc_t>
struct PersistentCta {
  int unit0, units, row0, rows;
  scalar_t* w;         // W_hh (forward) or W_hh^T (backward) rows of the units
  unsigned char* bufs; // cluster: the exchange buffers of even and odd steps (buf())
  size_t buf_bytes;
  scalar_t* rh;        // cluster forward, reset_before: r h of every unit
  acc_t* scratch;      // the tiles' matmul

  // The exchange buffer of step i (an address computed, not an array indexed: that
  // would live in local memory).
  GRU_HD scalar_t* buf(int i) const {
    return reinterpret_cast<scalar_t*>(bufs + (i % 2) * buf_bytes);
  }

  GRU_HD static PersistentCta at(unsigned char* smem, const PersistentLayout& L,
                                 const PersistentShape& g, int B, int H, bool cluster) {
    PersistentCta c;
    c.unit0 = int(blockIdx.x) * g.units;
    c.units = H - c.unit0 < g.units ? H - c.unit0 : g.units;
    c.row0 = cluster ? int(blockIdx.y) * g.rows : 0;
    c.rows = B - c.row0 < g.rows ? B - c.row0 : g.rows;
    c.w = reinterpret_cast<scalar_t*>(smem + L.w);
    c.bufs = smem + L.buf;
    c.buf_bytes = L.buf_bytes;
    c.rh = reinterpret_cast<scalar_t*>(smem + L.rh);
    c.scratch = reinterpret_cast<acc_t*>(smem + L.scratch);
    return c;
  }

  // body(origin) for every tile of the CTA's units x rows, in a fixed order. A tile's
  // matmul starts by storing its A tile into the scratch where the previous tile's
  // finishers read their partial sums: a barrier between them.
  template <typename TileT, typename Body>
  __device__ __forceinline__ void for_each_tile(const Body& body) const {
    for (int j0 = 0; j0 < units; j0 += TileT::kUnits) {
      for (int b0 = 0; b0 < rows; b0 += TileT::kRows) {
        body(TileOrigin{j0, b0});
#ifndef GRU_FAULT_MISSING_TILE_BARRIER  // emulator self-test only
        __syncthreads();
#endif
      }
    }
  }
};

// Copies `count` rows of `width` elements, row u of src at src + u * src_stride, into
// dst [count][width]; every thread of the block takes part.
template <typename scalar_t>
__device__ __forceinline__ void load_rows(scalar_t* dst, const scalar_t* src, int64_t src_stride,
                                          int count, int width) {
  for (int64_t e = threadIdx.x; e < (int64_t)count * width; e += kThreads) {
    dst[e] = src[(e / width) * src_stride + e % width];
  }
}

template <bool kCluster>
__device__ __forceinline__ void step_barrier() {
  if constexpr (kCluster) {
    GRU_CLUSTER_SYNC();
  } else {
    GRU_GRID_SYNC();
  }
}

// The forward of a whole sequence. kCluster: the cluster family; else cooperative.
template <typename scalar_t, typename acc_t, bool kResetAfter, bool kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    forward_persistent_kernel(ForwardParams<scalar_t> p, PersistentShape g, PersistentLayout L) {
  GRU_DYNAMIC_SMEM(unsigned char, smem);
  const int B = p.B, H = p.H;
  const auto c = PersistentCta<scalar_t, acc_t>::at(smem, L, g, B, H, kCluster);
  // W_hh's rows of the units, gate by gate: w [3][g.units][H] (rows past H never read).
  for (int gate = 0; gate < 3; ++gate) {
    load_rows(c.w + (int64_t)gate * g.units * H, p.w_hh + ((int64_t)gate * H + c.unit0) * H, H,
              c.units, H);
  }
  if constexpr (kCluster) load_rows(c.buf(0), p.hx + (int64_t)c.row0 * H, H, c.rows, H);
  __syncthreads();
  // Every CTA of the cluster has started: from here on its shared memory may be written.
  if constexpr (kCluster) GRU_CLUSTER_SYNC();

  for (int i = 0; i < p.T; ++i) {
    // The state before step i: [rows, H], rows numbered from c.row0 (cluster) or 0.
    const scalar_t* h = kCluster ? c.buf(i)
                        : i == 0 ? p.hx
                                 : p.output + (int64_t)step_of(i - 1, p.T, p.reverse) * B * H;
    const int t_ws = p.ws_steps == 1 ? 0 : step_of(i, p.T, p.reverse);
    const scalar_t* rh = kCluster ? c.rh : p.workspace + ((int64_t)kSlotHn * p.ws_steps + t_ws) * B * H;
    auto tiles = [&](auto phase, auto exchange) {
      constexpr ForwardPhase kPhase = decltype(phase)::value;
      using TileT = typename ForwardTileOf<acc_t, kPhase>::type;
      const Operands<scalar_t> op =
          forward_operands<kPhase>(h, rh, c.rows, c.row0, c.w, g.units, c.units, c.unit0, H);
      c.template for_each_tile<TileT>([&](TileOrigin o) {
        forward_tile<scalar_t, acc_t, kResetAfter, kPhase>(p, i, op, h, o, c.scratch, exchange);
      });
    };
    using Fused = std::integral_constant<ForwardPhase, ForwardPhase::kFused>;
    using ResetUpdate = std::integral_constant<ForwardPhase, ForwardPhase::kResetUpdate>;
    using Candidate = std::integral_constant<ForwardPhase, ForwardPhase::kCandidate>;
    if constexpr (kCluster) {
      const ClusterExchange<scalar_t> next{c.buf(i + 1), H, unsigned(g.cluster)};
      if constexpr (kResetAfter) {
        tiles(Fused{}, next);
      } else {
        tiles(ResetUpdate{}, ClusterExchange<scalar_t>{c.rh, H, unsigned(g.cluster)});
        GRU_CLUSTER_SYNC();
        tiles(Candidate{}, next);
      }
#ifndef GRU_FAULT_MISSING_CLUSTER_BARRIER  // emulator self-test only
      GRU_CLUSTER_SYNC();
#endif
    } else {
      if constexpr (kResetAfter) {
        tiles(Fused{}, NoExchange{});
      } else {
        tiles(ResetUpdate{}, NoExchange{});
        GRU_GRID_SYNC();
        tiles(Candidate{}, NoExchange{});
      }
#ifndef GRU_FAULT_MISSING_GRID_BARRIER  // emulator self-test only
      if (i + 1 < p.T) GRU_GRID_SYNC();  // the last step's state is read by no one here
#endif
    }
  }
}

// The backward of a whole sequence, and grad_hx. kCluster: the cluster family; else
// cooperative.
template <typename scalar_t, typename acc_t, bool kResetAfter, bool kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    backward_persistent_kernel(BackwardParams<scalar_t, acc_t> p, PersistentShape g,
                               PersistentLayout L) {
  GRU_DYNAMIC_SMEM(unsigned char, smem);
  const int B = p.B, H = p.H;
  const int64_t G = 3 * H, step = (int64_t)B * G;  // one step of dG / dGh
  const auto c = PersistentCta<scalar_t, acc_t>::at(smem, L, g, B, H, kCluster);
  // W_hh^T's rows of the units: w [g.units][3H].
  load_rows(c.w, p.w_hh_t + (int64_t)c.unit0 * G, G, c.units, int(G));
  __syncthreads();
  if constexpr (kCluster) GRU_CLUSTER_SYNC();

  // The gate gradients [rows, 3H] of step i (dGh; dG for reset_before, which aliases it):
  // the cluster's buffer, or global memory.
  auto gradients = [&](int i) -> scalar_t* {
    if (i >= p.T) return nullptr;
    if constexpr (kCluster) return c.buf(i);
    return p.dGh + step_of(i, p.T, p.reverse) * step;
  };
  auto tiles = [&](auto phase, int i) {
    constexpr BackwardPhase kPhase = decltype(phase)::value;
    const int before = kPhase == BackwardPhase::kFinal ? 0 : i + 1;
    const Operands<scalar_t> op = backward_operands<kPhase>(
        gradients(before), gradients(i), c.rows, c.row0, c.w, c.units, c.unit0, H);
    auto body = [&](auto exchange) {
      c.template for_each_tile<OneGateTile>([&](TileOrigin o) {
        backward_tile<scalar_t, acc_t, kResetAfter, kPhase>(p, i, op, o, c.scratch, exchange);
      });
    };
    if constexpr (kCluster) {
      body(ClusterExchange<scalar_t>{gradients(i), G, unsigned(g.cluster)});
    } else {
      body(NoExchange{});
    }
  };
  using Gates = std::integral_constant<BackwardPhase, BackwardPhase::kGates>;
  using ResetGate = std::integral_constant<BackwardPhase, BackwardPhase::kResetGate>;
  using Final = std::integral_constant<BackwardPhase, BackwardPhase::kFinal>;
  for (int i = p.T - 1; i >= 0; --i) {
    tiles(Gates{}, i);
    step_barrier<kCluster>();
    if constexpr (!kResetAfter) {
      tiles(ResetGate{}, i);
      step_barrier<kCluster>();
    }
  }
  tiles(Final{}, 0);
}

inline dim3 persistent_grid(const Plan& plan) {
  return plan.family == Family::kCluster ? dim3(plan.shape.cluster, plan.shape.clusters)
                                         : dim3(plan.shape.cluster);
}

// Whether the device can run `kernel` (the plan's family) as the plan says, checked
// before its launch (false: nothing is launched and the caller runs the step kernels):
// - a cluster kernel must hold sm_90 code (a binary built for older GPUs only, run from
//   PTX on an sm_90, has the __trap stubs of cuda_compat.h instead); a cluster of 16
//   needs the non-portable opt-in;
// - the occupancy API must say the blocks fit at once: a cluster of the plan's shape, or
//   every block of the cooperative grid. The launch also fails rather than hangs when
//   they do not (cuda_compat.h): a second guard. A plan of non-portable clusters must
//   also have room for all its clusters at once (else its clusters would run in two
//   waves, slower than the portable plan the caller then makes).
// It first sets the kernel's shared memory limit to the device's, the same value from
// every host thread, so that a call of one shape never lowers it under another's launch.
template <typename... KArgs>
bool persistent_fits(void (*kernel)(KArgs...), const Plan& plan) {
  const size_t smem = plan.layout.total;
  GRU_SET_MAX_DYNAMIC_SMEM(kernel, plan.device.smem_per_block_optin);
  if (plan.family == Family::kCluster) {
    const bool non_portable = plan.shape.cluster > kMaxPortableCluster;
    if (!gru_kernel_has_sm90_code(kernel) ||
        (non_portable && !GRU_ALLOW_NON_PORTABLE_CLUSTER(kernel))) {
      return false;
    }
    const int active = gru_max_active_clusters(kernel, persistent_grid(plan), dim3(kThreads),
                                               smem, plan.shape.cluster);
    return active >= (non_portable ? plan.shape.clusters : 1);
  }
  return int64_t(gru_max_active_blocks_per_sm(kernel, kThreads, smem)) * plan.device.sm_count >=
         plan.shape.cluster;
}

// Launches the plan's persistent forward; false when the device cannot make its blocks
// co-resident (nothing launched: the caller runs the step kernels).
template <typename scalar_t, typename acc_t, bool kResetAfter>
bool forward_persistent(const ForwardParams<scalar_t>& p, const Plan& plan, gru_stream_t stream) {
  const dim3 grid = persistent_grid(plan), block(kThreads);
  const size_t smem = plan.layout.total;
  if (plan.family == Family::kCluster) {
    auto* forward_cluster = &forward_persistent_kernel<scalar_t, acc_t, kResetAfter, true>;
    return persistent_fits(forward_cluster, plan) &&
           GRU_LAUNCH_CLUSTER(forward_cluster, grid, block, smem, plan.shape.cluster, stream, p,
                              plan.shape, plan.layout);
  }
  auto* forward_cooperative = &forward_persistent_kernel<scalar_t, acc_t, kResetAfter, false>;
  return persistent_fits(forward_cooperative, plan) &&
         GRU_LAUNCH_COOPERATIVE(forward_cooperative, grid, block, smem, stream, p, plan.shape,
                                plan.layout);
}

template <typename scalar_t, typename acc_t, bool kResetAfter>
bool backward_persistent(const BackwardParams<scalar_t, acc_t>& p, const Plan& plan,
                         gru_stream_t stream) {
  const dim3 grid = persistent_grid(plan), block(kThreads);
  const size_t smem = plan.layout.total;
  if (plan.family == Family::kCluster) {
    auto* backward_cluster = &backward_persistent_kernel<scalar_t, acc_t, kResetAfter, true>;
    return persistent_fits(backward_cluster, plan) &&
           GRU_LAUNCH_CLUSTER(backward_cluster, grid, block, smem, plan.shape.cluster, stream, p,
                              plan.shape, plan.layout);
  }
  auto* backward_cooperative = &backward_persistent_kernel<scalar_t, acc_t, kResetAfter, false>;
  return persistent_fits(backward_cooperative, plan) &&
         GRU_LAUNCH_COOPERATIVE(backward_cooperative, grid, block, smem, stream, p, plan.shape,
                                plan.layout);
}

}  // namespace cuda
}  // namespace gru_fused
