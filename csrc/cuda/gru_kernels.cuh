// CUDA kernels of the fused GRU: one launch per step (two for reset_before), each doing
// the recurrent matmul for a tile of hidden units x batch rows and the gate math in the
// same kernel. Their interface (tiles, parameter structs) is gru_kernel_params.h.
//
// The same source compiles with nvcc for the GPU and with g++ through the emulation
// layer (GRU_EMULATE_CUDA, see cuda_compat.h) for the tests; it uses only what that
// layer supports: thread/block indices, __syncthreads(), dynamic shared memory.
//
// The matmul (block_matmul): out[b, q] = sum_k A[b, k] Wr[q, k] for the block's weight
// rows q and batch rows b. Warp w owns the weight rows of its units, lane l the k with
// k % 32 == l; each thread keeps kOutputs accumulators in registers. Per chunk of kChunk
// k values, every thread first loads its next chunk (A tile values and its weights, a
// compile-time count of independent loads: one memory round trip), then multiplies the
// current chunk from shared memory, then stores the A values it loaded into the other
// buffer: one barrier per chunk. The lanes' partial sums then meet in shared memory and
// one lane per (unit, row) adds them in a fixed order: results do not depend on timing.
//
// Launches per step:
//   forward  reset_after: 1  (gh = h W_hh^T for r, z, n + gate math + update)
//            reset_before: 2 (gh_rz = h W_hrz^T + r, z, r h;  gh_n = (r h) W_hn^T + update)
//   backward reset_after: 1  (dh = dy + dh z + dGh_next W_hh, then gate gradients)
//            reset_before: 2 (dh as above with dG_next[r, z] W_hrz; then g = dn W_hn, dr)
//   plus one final launch for grad_hx. No atomics: each output element has one writer.
#pragma once

#include <cstdint>

#include "cuda/cuda_compat.h"
#include "cuda/gru_kernel_params.h"
#include "gru_math.h"

namespace gru_fused {
namespace cuda {

GRU_HD int step_of(int i, int T, bool reverse) { return reverse ? T - 1 - i : i; }

// Where a thread stands in its block: lane and warp, and, for the lanes that finish the
// sums (lane < kUnitsPerWarp * kRows), the unit u of its warp and the row r of the tile
// they finish, that is hidden unit j and batch row b.
template <typename TileT>
struct Place {
  int lane, warp, u, r, j, b;
  bool finisher;
  GRU_HD static Place of_this_thread() {
    Place s;
    s.lane = threadIdx.x % kLanes;
    s.warp = threadIdx.x / kLanes;
    s.finisher = s.lane < TileT::kUnitsPerWarp * TileT::kRows;
    s.u = s.lane / TileT::kRows;
    s.r = s.lane % TileT::kRows;
    s.j = blockIdx.x * TileT::kUnits + s.warp * TileT::kUnitsPerWarp + s.u;
    s.b = blockIdx.y * TileT::kRows + s.r;
    return s;
  }
};

// sum[g] = sum_{k < K} A[b, k] Wr[g * gate_rows + j, k], for the calling finisher's (b, j)
// (Place); other threads get nothing. A is [B, K] of row stride lda, Wr [rows, K] of row
// stride ldw. Every thread of the block must call it (it synchronises); rows b >= B,
// units j >= H and k >= K contribute zeros.
template <typename TileT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_matmul(const scalar_t* __restrict__ A, int64_t lda,
                                             const scalar_t* __restrict__ Wr, int64_t ldw,
                                             int64_t gate_rows, int B, int H, int K,
                                             acc_t (&sum)[TileT::kGates], acc_t* smem) {
  constexpr int G = TileT::kGates, U = TileT::kUnitsPerWarp, R = TileT::kRows;
  constexpr int kWR = TileT::kWeightRows, kKPerLane = TileT::kKPerLane;
  constexpr int kChunk = TileT::kChunk, kALoads = R * kChunk / kThreads;
  const auto s = Place<TileT>::of_this_thread();
  const int tid = threadIdx.x, lane = s.lane;
  const int b0 = blockIdx.y * R, j0 = blockIdx.x * TileT::kUnits + s.warp * U;

  // This thread's weight rows (q = g U + u), or nullptr beyond H.
  const scalar_t* w_row[kWR];
  GRU_UNROLL
  for (int g = 0; g < G; ++g) {
    GRU_UNROLL
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      w_row[g * U + u] = j < H ? Wr + (g * gate_rows + j) * ldw : nullptr;
    }
  }
  // Chunk c's loads into registers: the A tile values this thread stores (element
  // e = tid + i kThreads of the [R][kChunk] tile) and its weights (k = lane + 32 i).
  acc_t a_next[kALoads], w_next[kWR][kKPerLane];
  auto load_chunk = [&](int k0) {
    GRU_UNROLL
    for (int i = 0; i < kALoads; ++i) {
      const int e = tid + i * kThreads, r = e / kChunk, k = k0 + e % kChunk;
      a_next[i] = (b0 + r < B && k < K) ? acc_t(A[(b0 + r) * lda + k]) : acc_t(0);
    }
    GRU_UNROLL
    for (int q = 0; q < kWR; ++q) {
      GRU_UNROLL
      for (int i = 0; i < kKPerLane; ++i) {
        const int k = k0 + lane + i * kLanes;
#ifdef GRU_FAULT_OFF_BY_ONE  // sanitizer self-test only: reads one past the row's end
        const bool in = w_row[q] != nullptr && k <= K;
#else
        const bool in = w_row[q] != nullptr && k < K;
#endif
        w_next[q][i] = in ? acc_t(w_row[q][k]) : acc_t(0);
      }
    }
  };
  auto store_chunk = [&](acc_t* a_s) {
    GRU_UNROLL
    for (int i = 0; i < kALoads; ++i) a_s[tid + i * kThreads] = a_next[i];
  };

  acc_t acc[kWR][R];
  GRU_UNROLL
  for (int q = 0; q < kWR; ++q) {
    GRU_UNROLL
    for (int r = 0; r < R; ++r) acc[q][r] = acc_t(0);
  }
  const int chunks = (K + kChunk - 1) / kChunk;
  load_chunk(0);
  store_chunk(smem);
  __syncthreads();
  for (int c = 0; c < chunks; ++c) {
    acc_t w[kWR][kKPerLane];
    GRU_UNROLL
    for (int q = 0; q < kWR; ++q) {
      GRU_UNROLL
      for (int i = 0; i < kKPerLane; ++i) w[q][i] = w_next[q][i];
    }
    if (c + 1 < chunks) load_chunk((c + 1) * kChunk);  // in flight during the FMAs below
    const acc_t* a_s = smem + (c % 2) * R * kChunk;
    GRU_UNROLL
    for (int i = 0; i < kKPerLane; ++i) {
      acc_t a[R];
      GRU_UNROLL
      for (int r = 0; r < R; ++r) a[r] = a_s[r * kChunk + lane + i * kLanes];
      GRU_UNROLL
      for (int q = 0; q < kWR; ++q) {
        GRU_UNROLL
        for (int r = 0; r < R; ++r) acc[q][r] += a[r] * w[q][i];
      }
    }
    if (c + 1 < chunks) store_chunk(smem + ((c + 1) % 2) * R * kChunk);
#ifdef GRU_FAULT_MISSING_BARRIER  // sanitizer self-test only: the partials below overwrite
    if (c + 1 < chunks)           // the last A tile while other warps still read it
#endif
    __syncthreads();
  }

  // The partial sums [kWarps][kOutputs][kLanes + 1] overwrite the A tiles: the barrier
  // above ends the last read of them.
  acc_t* partial = smem + s.warp * TileT::kOutputs * (kLanes + 1);
  GRU_UNROLL
  for (int q = 0; q < kWR; ++q) {
    GRU_UNROLL
    for (int r = 0; r < R; ++r) partial[(q * R + r) * (kLanes + 1) + lane] = acc[q][r];
  }
  __syncthreads();
  if (!s.finisher) return;
  // The finisher of (u, r): gate g's 32 partials, in four interleaved chains then
  // pairwise, the same order every time.
  GRU_UNROLL
  for (int g = 0; g < G; ++g) {
    const acc_t* p = partial + ((g * U + s.u) * R + s.r) * (kLanes + 1);
    acc_t c[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    GRU_UNROLL
    for (int l = 0; l < kLanes; ++l) c[l % 4] += p[l];
    sum[g] = (c[0] + c[1]) + (c[2] + c[3]);
  }
}

enum class ForwardPhase { kFused, kResetUpdate, kCandidate };

template <typename acc_t, ForwardPhase kPhase>
struct ForwardTileOf {
  using type = OneGateTile;
};
template <typename acc_t>
struct ForwardTileOf<acc_t, ForwardPhase::kFused> {
  using type = ForwardFusedTile<acc_t>;
};
template <typename acc_t>
struct ForwardTileOf<acc_t, ForwardPhase::kResetUpdate> {
  using type = ForwardResetTile<acc_t>;
};

// Step i of the forward. kFused: reset_after's whole step. kResetUpdate, kCandidate:
// reset_before's two launches (the candidate's matmul needs r h of every unit).
template <typename scalar_t, typename acc_t, bool kResetAfter, ForwardPhase kPhase>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    forward_step_kernel(ForwardParams<scalar_t> p, int i) {
  using Cell = GruCell<acc_t, kResetAfter>;
  using TileT = typename ForwardTileOf<acc_t, kPhase>::type;
  GRU_DYNAMIC_SMEM(acc_t, smem);
  const int B = p.B, H = p.H;
  const int t = step_of(i, p.T, p.reverse);
  const auto s = Place<TileT>::of_this_thread();
  const int b = s.b, j = s.j;
  const scalar_t* hp = i == 0 ? p.hx : p.output + (int64_t)step_of(i - 1, p.T, p.reverse) * B * H;
  // The workspace: [4, ws_steps, B, H]; gru_inference keeps one step's slots.
  const int t_ws = p.ws_steps == 1 ? 0 : t;
  const int64_t slot = (int64_t)p.ws_steps * B * H;
  const int64_t e = ((int64_t)t * B + b) * H + j;        // (t, b, j) in [T, B, H]
  const int64_t ews = ((int64_t)t_ws * B + b) * H + j;   // its place in each slot
  scalar_t* ws = p.workspace;
  const scalar_t* gib = p.gi + ((int64_t)t * B + b) * 3 * H;

  if constexpr (kPhase == ForwardPhase::kFused) {
#ifdef GRU_FAULT_DIVERGENT_BARRIER  // emulator self-test only: part of the block skips the barriers
    if (int(blockIdx.y * TileT::kRows + threadIdx.x % TileT::kRows) >= B) return;
#endif
    acc_t gh[3];
    block_matmul<TileT>(hp, H, p.w_hh, H, H, B, H, H, gh, smem);
    if (!s.finisher || b >= B || j >= H) return;
    acc_t r, z, hn = gh[kGateN] + (p.b_hn ? acc_t(p.b_hn[j]) : acc_t(0));
    Cell::gates_rz(acc_t(gib[kGateR * H + j]), acc_t(gib[kGateZ * H + j]), gh[kGateR],
                   gh[kGateZ], r, z);
    acc_t n = Cell::candidate(acc_t(gib[kGateN * H + j]), hn, r);
    if (p.lengths && t >= p.lengths[b]) Cell::padded(r, z, n, hn);
    p.output[e] = scalar_t(Cell::update(z, n, acc_t(hp[(int64_t)b * H + j])));
    ws[kSlotR * slot + ews] = scalar_t(r);
    ws[kSlotZ * slot + ews] = scalar_t(z);
    ws[kSlotN * slot + ews] = scalar_t(n);
    ws[kSlotHn * slot + ews] = scalar_t(hn);
  } else if constexpr (kPhase == ForwardPhase::kResetUpdate) {
    acc_t gh[2];
    block_matmul<TileT>(hp, H, p.w_hh, H, H, B, H, H, gh, smem);
    if (!s.finisher || b >= B || j >= H) return;
    acc_t r, z;
    Cell::gates_rz(acc_t(gib[kGateR * H + j]), acc_t(gib[kGateZ * H + j]), gh[kGateR],
                   gh[kGateZ], r, z);
    ws[kSlotR * slot + ews] = scalar_t(r);
    ws[kSlotZ * slot + ews] = scalar_t(z);
    ws[kSlotHn * slot + ews] = scalar_t(r * acc_t(hp[(int64_t)b * H + j]));
  } else {
    // The r h of every unit of the step, written by the kResetUpdate launch.
    const scalar_t* rh = ws + kSlotHn * slot + (int64_t)t_ws * B * H;
    acc_t gh[1];
    block_matmul<TileT>(rh, H, p.w_hh + (int64_t)kGateN * H * H, H, 0, B, H, H, gh, smem);
    if (!s.finisher || b >= B || j >= H) return;
    acc_t r = acc_t(ws[kSlotR * slot + ews]), z = acc_t(ws[kSlotZ * slot + ews]);
    acc_t n = Cell::candidate(acc_t(gib[kGateN * H + j]), gh[0], r);
    // Other blocks are still reading r h: a padded step leaves that slot alone (its
    // gradients are zero whatever it holds).
    acc_t unused_hn;
    if (p.lengths && t >= p.lengths[b]) Cell::padded(r, z, n, unused_hn);
#ifdef GRU_FAULT_CROSS_BLOCK_RACE  // emulator self-test only: overwrites r h other blocks read
    ws[kSlotHn * slot + ews] = scalar_t(n);
#endif
    p.output[e] = scalar_t(Cell::update(z, n, acc_t(hp[(int64_t)b * H + j])));
    ws[kSlotR * slot + ews] = scalar_t(r);
    ws[kSlotZ * slot + ews] = scalar_t(z);
    ws[kSlotN * slot + ews] = scalar_t(n);
  }
}

enum class BackwardPhase { kGates, kResetGate, kFinal };

// Step i of the backward (i runs from T-1 down to 0), or the final grad_hx launch.
// kGates: dh = dy_t + dh_direct + (dGh of the step processed before) W_hh, then the gate
//         gradients (reset_before: all but dr).
// kResetGate (reset_before): g = dn W_hn over all units, then dr and g r into dh_direct.
// kFinal: grad_hx = dh_direct + (dGh of the last step processed) W_hh.
// Each matmul reads W_hh by columns, that is W_hh^T [H, 3H] by rows.
template <typename scalar_t, typename acc_t, bool kResetAfter, BackwardPhase kPhase>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    backward_step_kernel(BackwardParams<scalar_t, acc_t> p, int i) {
  using Cell = GruCell<acc_t, kResetAfter>;
  using TileT = OneGateTile;
  GRU_DYNAMIC_SMEM(acc_t, smem);
  const int B = p.B, H = p.H, G = 3 * H;
  const auto s = Place<TileT>::of_this_thread();
  const int b = s.b, j = s.j;
  const bool mine = s.finisher && b < B && j < H;
  const int64_t bj = (int64_t)b * H + j;
  // The recurrent matmul's operand: reset_after uses all of dGh; reset_before only the
  // r, z columns of dG (the candidate's share went through g = dn W_hn already).
  const int K = kResetAfter ? G : 2 * H;

  if constexpr (kPhase == BackwardPhase::kFinal) {
    const int t0 = step_of(0, p.T, p.reverse);
    acc_t rec[1];
    block_matmul<TileT>(p.dGh + (int64_t)t0 * B * G, G, p.w_hh_t, G, 0, B, H, K, rec, smem);
    if (mine) p.grad_hx[bj] = scalar_t(p.dh_direct[bj] + rec[0]);
    return;
  }

  const int t = step_of(i, p.T, p.reverse);
  const scalar_t* hp = i == 0 ? p.hx : p.output + (int64_t)step_of(i - 1, p.T, p.reverse) * B * H;
  const int64_t slot = (int64_t)p.T * B * H;
  const int64_t e = ((int64_t)t * B + b) * H + j;
  const scalar_t* ws = p.workspace;
  scalar_t* dGb = p.dG + ((int64_t)t * B + b) * G;

  if constexpr (kPhase == BackwardPhase::kGates) {
    acc_t dh_next = acc_t(0);
    if (i == p.T - 1) {
      if (mine) dh_next = acc_t(p.grad_h_n[bj]);
    } else {  // block-uniform branch: every thread takes part in the matmul
      const int t_next = step_of(i + 1, p.T, p.reverse);
      acc_t rec[1];
      block_matmul<TileT>(p.dGh + (int64_t)t_next * B * G, G, p.w_hh_t, G, 0, B, H, K, rec,
                          smem);
      if (mine) dh_next = rec[0] + p.dh_direct[bj];
    }
    if (!mine) return;
    acc_t dr, dz, dn, dgh_n, dh_prev;
    Cell::backward(acc_t(p.grad_output[e]) + dh_next, acc_t(ws[kSlotR * slot + e]),
                   acc_t(ws[kSlotZ * slot + e]), acc_t(ws[kSlotN * slot + e]),
                   acc_t(hp[bj]), acc_t(ws[kSlotHn * slot + e]), dr, dz, dn, dgh_n, dh_prev);
    dGb[kGateZ * H + j] = scalar_t(dz);
    dGb[kGateN * H + j] = scalar_t(dn);
    if constexpr (kResetAfter) {
      scalar_t* dGhb = p.dGh + ((int64_t)t * B + b) * G;
      dGb[kGateR * H + j] = scalar_t(dr);
      dGhb[kGateR * H + j] = scalar_t(dr);
      dGhb[kGateZ * H + j] = scalar_t(dz);
      dGhb[kGateN * H + j] = scalar_t(dgh_n);
    }
    p.dh_direct[bj] = dh_prev;
  } else {  // kResetGate: g = dn W_hn, W_hn^T being columns [2H, 3H) of W_hh^T
    acc_t g[1];
    block_matmul<TileT>(p.dG + (int64_t)t * B * G + kGateN * H, G,
                        p.w_hh_t + (int64_t)kGateN * H, G, 0, B, H, H, g, smem);
    if (!mine) return;
    acc_t dr, dh_prev = p.dh_direct[bj];
    Cell::reset_before_dr(g[0], acc_t(ws[kSlotR * slot + e]), acc_t(hp[bj]), dr, dh_prev);
    dGb[kGateR * H + j] = scalar_t(dr);
    p.dh_direct[bj] = dh_prev;
  }
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

template <typename TileT>
dim3 grid_for(int B, int H) {
  return dim3(ceil_div(H, TileT::kUnits), ceil_div(B, TileT::kRows));
}

template <typename scalar_t, typename acc_t, bool kResetAfter, ForwardPhase kPhase>
void launch_forward(const ForwardParams<scalar_t>& p, int i, gru_stream_t stream) {
  using TileT = typename ForwardTileOf<acc_t, kPhase>::type;
  auto* kernel = &forward_step_kernel<scalar_t, acc_t, kResetAfter, kPhase>;
  GRU_LAUNCH(kernel, grid_for<TileT>(p.B, p.H), dim3(kThreads),
             TileT::template smem_bytes<acc_t>(), stream, p, i);
}

// The forward step loop: T launches (2T for reset_before) on one stream, no host sync.
template <typename scalar_t, typename acc_t, bool kResetAfter>
void forward_steps(const ForwardParams<scalar_t>& p, gru_stream_t stream) {
  for (int i = 0; i < p.T; ++i) {
    if constexpr (kResetAfter) {
      launch_forward<scalar_t, acc_t, true, ForwardPhase::kFused>(p, i, stream);
    } else {
      launch_forward<scalar_t, acc_t, false, ForwardPhase::kResetUpdate>(p, i, stream);
      launch_forward<scalar_t, acc_t, false, ForwardPhase::kCandidate>(p, i, stream);
    }
  }
}

// The backward step loop: T launches (2T for reset_before) plus one for grad_hx.
template <typename scalar_t, typename acc_t, bool kResetAfter>
void backward_steps(const BackwardParams<scalar_t, acc_t>& p, gru_stream_t stream) {
  const dim3 grid = grid_for<OneGateTile>(p.B, p.H), block(kThreads);
  const size_t smem = OneGateTile::smem_bytes<acc_t>();
  auto* gates = &backward_step_kernel<scalar_t, acc_t, kResetAfter, BackwardPhase::kGates>;
  auto* final_ = &backward_step_kernel<scalar_t, acc_t, kResetAfter, BackwardPhase::kFinal>;
  for (int i = p.T - 1; i >= 0; --i) {
    GRU_LAUNCH(gates, grid, block, smem, stream, p, i);
    if constexpr (!kResetAfter) {
      auto* reset = &backward_step_kernel<scalar_t, acc_t, false, BackwardPhase::kResetGate>;
      GRU_LAUNCH(reset, grid, block, smem, stream, p, i);
    }
  }
  GRU_LAUNCH(final_, grid, block, smem, stream, p, 0);
}

}  // namespace cuda
}  // namespace gru_fused
