// CUDA kernels of the fused GRU: one launch per step (two for reset_before), each doing
// the recurrent matmul for a tile of hidden units x batch rows and the gate math in the
// same kernel. Their interface (tiles, parameter structs) is gru_kernel_params.h. The
// work of one tile (forward_tile, backward_tile) is also what the persistent kernels
// (gru_persistent.cuh) loop over, with their operands in shared memory.
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

// A tile's first unit (in the numbering of its W operand's units) and first row (of its
// A operand's rows). A step kernel's block has one tile; a persistent CTA loops over many.
struct TileOrigin {
  int j0, b0;
};

template <typename TileT>
GRU_HD TileOrigin block_origin() {
  return {int(blockIdx.x) * TileT::kUnits, int(blockIdx.y) * TileT::kRows};
}

// Where a thread stands in a tile: lane and warp, and, for the lanes that finish the
// sums (lane < kUnitsPerWarp * kRows), the unit u of its warp and the row r of the tile
// they finish, that is unit j and row b (from the origin's).
template <typename TileT>
struct Place {
  int lane, warp, u, r, j, b;
  bool finisher;
  GRU_HD static Place at(TileOrigin o) {
    Place s;
    s.lane = threadIdx.x % kLanes;
    s.warp = threadIdx.x / kLanes;
    s.finisher = s.lane < TileT::kUnitsPerWarp * TileT::kRows;
    s.u = s.lane / TileT::kRows;
    s.r = s.lane % TileT::kRows;
    s.j = o.j0 + s.warp * TileT::kUnitsPerWarp + s.u;
    s.b = o.b0 + s.r;
    return s;
  }
};

// sum[g] = sum_{k < K} A[b, k] Wr[g * gate_rows + j, k], for the calling finisher's (b, j)
// (Place::at(o)); other threads get nothing. A is [B, K] of row stride lda, Wr [rows, K] of row
// stride ldw. Every thread of the block must call it (it synchronises); rows b >= B,
// units j >= H and k >= K contribute zeros.
template <typename TileT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_matmul(const scalar_t* __restrict__ A, int64_t lda,
                                             const scalar_t* __restrict__ Wr, int64_t ldw,
                                             int64_t gate_rows, int B, int H, int K,
                                             acc_t (&sum)[TileT::kGates], acc_t* smem,
                                             TileOrigin o) {
  constexpr int G = TileT::kGates, U = TileT::kUnitsPerWarp, R = TileT::kRows;
  constexpr int kWR = TileT::kWeightRows, kKPerLane = TileT::kKPerLane;
  constexpr int kChunk = TileT::kChunk, kALoads = R * kChunk / kThreads;
  const auto s = Place<TileT>::at(o);
  const int tid = threadIdx.x, lane = s.lane;
  const int b0 = o.b0, j0 = o.j0 + s.warp * U;

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

// A tile's matmul operands, wherever they live (global memory for the step kernels and
// the cooperative kernels' A, shared memory for the persistent kernels' W and the
// cluster kernels' A). Tile row b (of A) is batch row row0 + b; tile unit j (of W) is
// hidden unit unit0 + j.
template <typename scalar_t>
struct Operands {
  const scalar_t* a;  // [rows, K] of row stride lda: h, r h, or gate gradients
  int64_t lda;
  int rows;
  int row0;
  const scalar_t* w;  // [gates * gate_rows, K] of row stride ldw: W_hh or W_hh^T rows
  int64_t ldw, gate_rows;
  int units;
  int unit0;
};

// What a finished tile element also sends beyond global memory: nothing (step and
// cooperative kernels; the next step reads global memory), or (cluster kernels) the
// value at (row b, column col) of a [rows, ld] buffer in every CTA of the cluster.
struct NoExchange {
  template <typename scalar_t>
  __device__ __forceinline__ void operator()(int, int64_t, scalar_t) const {}
};

// Forward phase kPhase of step i for one tile. h_prev [rows, H] is the state before the
// step, rows numbered as A's. kFused: reset_after's whole step. kResetUpdate,
// kCandidate: reset_before's two phases (the candidate's matmul needs r h of every unit,
// which kResetUpdate sends on). Every thread of the block calls it.
template <typename scalar_t, typename acc_t, bool kResetAfter, ForwardPhase kPhase,
          typename Exchange>
__device__ __forceinline__ void forward_tile(const ForwardParams<scalar_t>& p, int i,
                                             const Operands<scalar_t>& op,
                                             const scalar_t* h_prev, TileOrigin o, acc_t* smem,
                                             const Exchange& exchange) {
  using Cell = GruCell<acc_t, kResetAfter>;
  using TileT = typename ForwardTileOf<acc_t, kPhase>::type;
  const int B = p.B, H = p.H;
  acc_t gh[TileT::kGates];
  block_matmul<TileT>(op.a, op.lda, op.w, op.ldw, op.gate_rows, op.rows, op.units, H, gh, smem, o);
  const auto s = Place<TileT>::at(o);
  if (!s.finisher || s.b >= op.rows || s.j >= op.units) return;
  const int b = op.row0 + s.b, j = op.unit0 + s.j;
  const int t = step_of(i, p.T, p.reverse);
  // The workspace: [4, ws_steps, B, H]; gru_inference keeps one step's slots.
  const int t_ws = p.ws_steps == 1 ? 0 : t;
  const int64_t slot = (int64_t)p.ws_steps * B * H;
  const int64_t e = ((int64_t)t * B + b) * H + j;        // (t, b, j) in [T, B, H]
  const int64_t ews = ((int64_t)t_ws * B + b) * H + j;   // its place in each slot
  scalar_t* ws = p.workspace;
  const scalar_t* gib = p.gi + ((int64_t)t * B + b) * 3 * H;
  const acc_t h = acc_t(h_prev[(int64_t)s.b * H + j]);

  if constexpr (kPhase == ForwardPhase::kFused) {
    acc_t r, z, hn = gh[kGateN] + (p.b_hn ? acc_t(p.b_hn[j]) : acc_t(0));
    Cell::gates_rz(acc_t(gib[kGateR * H + j]), acc_t(gib[kGateZ * H + j]), gh[kGateR],
                   gh[kGateZ], r, z);
    acc_t n = Cell::candidate(acc_t(gib[kGateN * H + j]), hn, r);
    if (p.lengths && t >= p.lengths[b]) Cell::padded(r, z, n, hn);
    const scalar_t h_new = scalar_t(Cell::update(z, n, h));
    p.output[e] = h_new;
    exchange(s.b, j, h_new);
    ws[kSlotR * slot + ews] = scalar_t(r);
    ws[kSlotZ * slot + ews] = scalar_t(z);
    ws[kSlotN * slot + ews] = scalar_t(n);
    ws[kSlotHn * slot + ews] = scalar_t(hn);
  } else if constexpr (kPhase == ForwardPhase::kResetUpdate) {
    acc_t r, z;
    Cell::gates_rz(acc_t(gib[kGateR * H + j]), acc_t(gib[kGateZ * H + j]), gh[kGateR],
                   gh[kGateZ], r, z);
    ws[kSlotR * slot + ews] = scalar_t(r);
    ws[kSlotZ * slot + ews] = scalar_t(z);
    const scalar_t rh = scalar_t(r * h);
    ws[kSlotHn * slot + ews] = rh;
    exchange(s.b, j, rh);
  } else {
    acc_t r = acc_t(ws[kSlotR * slot + ews]), z = acc_t(ws[kSlotZ * slot + ews]);
    acc_t n = Cell::candidate(acc_t(gib[kGateN * H + j]), gh[0], r);
    // Other blocks are still reading r h: a padded step leaves that slot alone (its
    // gradients are zero whatever it holds).
    acc_t unused_hn;
    if (p.lengths && t >= p.lengths[b]) Cell::padded(r, z, n, unused_hn);
#ifdef GRU_FAULT_CROSS_BLOCK_RACE  // emulator self-test only: overwrites r h other blocks read
    ws[kSlotHn * slot + ews] = scalar_t(n);
#endif
    const scalar_t h_new = scalar_t(Cell::update(z, n, h));
    p.output[e] = h_new;
    exchange(s.b, j, h_new);
    ws[kSlotR * slot + ews] = scalar_t(r);
    ws[kSlotZ * slot + ews] = scalar_t(z);
    ws[kSlotN * slot + ews] = scalar_t(n);
  }
}

// The forward's operands of phase kPhase: A is the state h (or, for the candidate, r h)
// [rows, H]; W holds gate_rows rows per gate, [3][gate_rows][H] (W_hh itself: H).
template <ForwardPhase kPhase, typename scalar_t>
GRU_HD Operands<scalar_t> forward_operands(const scalar_t* h, const scalar_t* rh, int rows,
                                           int row0, const scalar_t* w, int64_t gate_rows,
                                           int units, int unit0, int H) {
  const bool candidate = kPhase == ForwardPhase::kCandidate;
  return {candidate ? rh : h,
          H,
          rows,
          row0,
          candidate ? w + kGateN * gate_rows * H : w,
          H,
          candidate ? 0 : gate_rows,
          units,
          unit0};
}

// Step i of the forward, one launch per phase: a block per tile, operands in global
// memory.
template <typename scalar_t, typename acc_t, bool kResetAfter, ForwardPhase kPhase>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    forward_step_kernel(ForwardParams<scalar_t> p, int i) {
  using TileT = typename ForwardTileOf<acc_t, kPhase>::type;
  GRU_DYNAMIC_SMEM(acc_t, smem);
  const int B = p.B, H = p.H;
  const scalar_t* hp = i == 0 ? p.hx : p.output + (int64_t)step_of(i - 1, p.T, p.reverse) * B * H;
  // The r h of every unit of the step, written by the kResetUpdate launch.
  const int t_ws = p.ws_steps == 1 ? 0 : step_of(i, p.T, p.reverse);
  const scalar_t* rh = p.workspace + ((int64_t)kSlotHn * p.ws_steps + t_ws) * B * H;
#ifdef GRU_FAULT_DIVERGENT_BARRIER  // emulator self-test only: part of the block skips the barriers
  if (kPhase == ForwardPhase::kFused &&
      int(blockIdx.y * TileT::kRows + threadIdx.x % TileT::kRows) >= B) {
    return;
  }
#endif
  forward_tile<scalar_t, acc_t, kResetAfter, kPhase>(
      p, i, forward_operands<kPhase>(hp, rh, B, 0, p.w_hh, H, H, 0, H), hp,
      block_origin<TileT>(), smem, NoExchange{});
}

enum class BackwardPhase { kGates, kResetGate, kFinal };

// Backward phase kPhase of step i (i runs from T-1 down to 0) for one tile, or the final
// grad_hx. Every thread of the block calls it.
// kGates: dh = dy_t + dh_direct + (dGh of the step processed before: A) W_hh, then the
//         gate gradients (reset_before: all but dr).
// kResetGate (reset_before): g = dn W_hn over all units (A: this step's dn), then dr and
//         g r into dh_direct.
// kFinal: grad_hx = dh_direct + (dGh of the last step processed: A) W_hh.
// Each matmul reads W_hh by columns, that is W_hh^T [H, 3H] by rows (op.w).
template <typename scalar_t, typename acc_t, bool kResetAfter, BackwardPhase kPhase,
          typename Exchange>
__device__ __forceinline__ void backward_tile(const BackwardParams<scalar_t, acc_t>& p, int i,
                                              const Operands<scalar_t>& op, TileOrigin o,
                                              acc_t* smem, const Exchange& exchange) {
  using Cell = GruCell<acc_t, kResetAfter>;
  using TileT = OneGateTile;
  const int B = p.B, H = p.H, G = 3 * H;
  const auto s = Place<TileT>::at(o);
  const bool mine = s.finisher && s.b < op.rows && s.j < op.units;
  const int b = op.row0 + s.b, j = op.unit0 + s.j;
  const int64_t bj = (int64_t)b * H + j;
  // The recurrent matmul's operand: reset_after uses all of dGh; reset_before only the
  // r, z columns of dG (the candidate's share went through g = dn W_hn already).
  const int K = kResetAfter ? G : 2 * H;

  if constexpr (kPhase == BackwardPhase::kFinal) {
    acc_t rec[1];
    block_matmul<TileT>(op.a, op.lda, op.w, op.ldw, 0, op.rows, op.units, K, rec, smem, o);
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
      acc_t rec[1];
      block_matmul<TileT>(op.a, op.lda, op.w, op.ldw, 0, op.rows, op.units, K, rec, smem, o);
      if (mine) dh_next = rec[0] + p.dh_direct[bj];
    }
    if (!mine) return;
    acc_t dr, dz, dn, dgh_n, dh_prev;
    Cell::backward(acc_t(p.grad_output[e]) + dh_next, acc_t(ws[kSlotR * slot + e]),
                   acc_t(ws[kSlotZ * slot + e]), acc_t(ws[kSlotN * slot + e]),
                   acc_t(hp[bj]), acc_t(ws[kSlotHn * slot + e]), dr, dz, dn, dgh_n, dh_prev);
    dGb[kGateZ * H + j] = scalar_t(dz);
    dGb[kGateN * H + j] = scalar_t(dn);
    exchange(s.b, kGateZ * H + j, scalar_t(dz));
    if constexpr (kResetAfter) {
      scalar_t* dGhb = p.dGh + ((int64_t)t * B + b) * G;
      dGb[kGateR * H + j] = scalar_t(dr);
      dGhb[kGateR * H + j] = scalar_t(dr);
      dGhb[kGateZ * H + j] = scalar_t(dz);
      dGhb[kGateN * H + j] = scalar_t(dgh_n);
      exchange(s.b, kGateR * H + j, scalar_t(dr));
      exchange(s.b, kGateN * H + j, scalar_t(dgh_n));
    } else {
      exchange(s.b, kGateN * H + j, scalar_t(dn));
    }
    p.dh_direct[bj] = dh_prev;
  } else {  // kResetGate: g = dn W_hn, W_hn^T being columns [2H, 3H) of W_hh^T
    acc_t g[1];
    block_matmul<TileT>(op.a, op.lda, op.w, op.ldw, 0, op.rows, op.units, H, g, smem, o);
    if (!mine) return;
    acc_t dr, dh_prev = p.dh_direct[bj];
    Cell::reset_before_dr(g[0], acc_t(ws[kSlotR * slot + e]), acc_t(hp[bj]), dr, dh_prev);
    dGb[kGateR * H + j] = scalar_t(dr);
    exchange(s.b, kGateR * H + j, scalar_t(dr));
    p.dh_direct[bj] = dh_prev;
  }
}

// The backward's operands of phase kPhase. A: the gate gradients [rows, 3H] of the step
// processed before (kGates, kFinal) or of this step (kResetGate, which reads its dn
// columns); W: W_hh^T rows [units][3H] (kResetGate: their W_hn^T columns).
template <BackwardPhase kPhase, typename scalar_t>
GRU_HD Operands<scalar_t> backward_operands(const scalar_t* before, const scalar_t* current,
                                            int rows, int row0, const scalar_t* w_t, int units,
                                            int unit0, int H) {
  const bool reset = kPhase == BackwardPhase::kResetGate;
  return {reset ? current + kGateN * H : before,
          3 * H,
          rows,
          row0,
          reset ? w_t + kGateN * H : w_t,
          3 * H,
          0,
          units,
          unit0};
}

// Step i of the backward, one launch per phase, or the final grad_hx launch: a block per
// tile, operands in global memory.
template <typename scalar_t, typename acc_t, bool kResetAfter, BackwardPhase kPhase>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    backward_step_kernel(BackwardParams<scalar_t, acc_t> p, int i) {
  GRU_DYNAMIC_SMEM(acc_t, smem);
  const int64_t step = (int64_t)p.B * 3 * p.H;  // one step of dG / dGh
  // kFinal: "before" is step i = 0's; kGates: step i + 1's (none at i = T - 1).
  const int before = kPhase == BackwardPhase::kFinal ? 0 : i + 1;
  const scalar_t* dgh_before =
      before < p.T ? p.dGh + step_of(before, p.T, p.reverse) * step : nullptr;
  const scalar_t* dg_current = p.dG + step_of(i, p.T, p.reverse) * step;
  backward_tile<scalar_t, acc_t, kResetAfter, kPhase>(
      p, i, backward_operands<kPhase>(dgh_before, dg_current, p.B, 0, p.w_hh_t, p.H, 0, p.H),
      block_origin<OneGateTile>(), smem, NoExchange{});
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

template <typename TileT>
dim3 grid_for(int B, int H) {
  return dim3(ceil_div(H, TileT::kUnits), ceil_div(B, TileT::kRows));
}

template <typename scalar_t, typename acc_t, bool kResetAfter, ForwardPhase kPhase>
void launch_forward(const ForwardParams<scalar_t>& p, int i, gru_stream_t stream) {
  using TileT = typename ForwardTileOf<acc_t, kPhase>::type;
  auto* forward_step = &forward_step_kernel<scalar_t, acc_t, kResetAfter, kPhase>;
  GRU_LAUNCH(forward_step, grid_for<TileT>(p.B, p.H), dim3(kThreads),
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
  auto* backward_step = &backward_step_kernel<scalar_t, acc_t, kResetAfter, BackwardPhase::kGates>;
  auto* backward_final = &backward_step_kernel<scalar_t, acc_t, kResetAfter, BackwardPhase::kFinal>;
  for (int i = p.T - 1; i >= 0; --i) {
    GRU_LAUNCH(backward_step, grid, block, smem, stream, p, i);
    if constexpr (!kResetAfter) {
      auto* backward_reset = &backward_step_kernel<scalar_t, acc_t, false, BackwardPhase::kResetGate>;
      GRU_LAUNCH(backward_reset, grid, block, smem, stream, p, i);
    }
  }
  GRU_LAUNCH(backward_final, grid, block, smem, stream, p, 0);
}

}  // namespace cuda
}  // namespace gru_fused
