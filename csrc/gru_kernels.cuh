// CUDA kernels of the fused GRU: one launch per step (two for reset_before), each doing
// the recurrent matmul for a tile of hidden units and the gate math in the same kernel.
// Their interface (parameter structs, tile sizes) is gru_kernel_params.h.
//
// The same source compiles with nvcc for the GPU and with g++ through the emulation
// layer (GRU_EMULATE_CUDA, see cuda_compat.h) for the tests; it uses only what that
// layer supports: thread/block indices, __syncthreads(), dynamic shared memory.
//
// Tiling: a block of kTileJ x kTileB threads owns hidden units [j0, j0 + kTileJ) of
// batch rows [b0, b0 + kTileB); thread (x, y) computes unit j0 + x of row b0 + y. The
// reduction dimension is staged through shared memory kTileK at a time.
//
// Launches per step:
//   forward  reset_after: 1  (gh = h W_hh^T for r, z, n + gate math + update)
//            reset_before: 2 (gh_rz = h W_hrz^T + r, z, r h;  gh_n = (r h) W_hn^T + update)
//   backward reset_after: 1  (dh = dy + dh z + dGh_next W_hh, then gate gradients)
//            reset_before: 2 (dh as above with dG_next[r, z] W_hrz; then g = dn W_hn, dr)
//   plus one final launch for grad_hx. No atomics: each output element has one writer.
#pragma once

#include <cstdint>

#include "cuda_compat.h"
#include "gru_kernel_params.h"
#include "gru_math.h"

namespace gru_fused {
namespace cuda {

GRU_HD int step_of(int i, int T, bool reverse) { return reverse ? T - 1 - i : i; }

// acc[g] = sum_{k < K} A[b, k] W[g H + j, k]  for the thread's (b, j): the forward's
// h W^T, W given by rows (W_hh's gate blocks, row stride K). Every thread of the block
// must call it (it synchronises); out-of-range rows and units contribute zeros.
// smem: A tile [kTileB][kTileK], W tile [kGates][kTileJ][kTileK + 1] (padded: no bank
// conflicts when a warp reads one k across 32 rows).
template <int kGates, typename scalar_t, typename acc_t>
__device__ __forceinline__ void matmul_w_rows(const scalar_t* __restrict__ A, int64_t lda,
                                              const scalar_t* __restrict__ W, int H, int B,
                                              int K, int b0, int j0, acc_t (&acc)[kGates],
                                              acc_t* smem) {
  acc_t* a_s = smem;
  acc_t* w_s = smem + kTileB * kTileK;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileJ + tx;
  for (int g = 0; g < kGates; ++g) acc[g] = acc_t(0);
  for (int k0 = 0; k0 < K; k0 += kTileK) {
    {
      const int b = b0 + ty, k = k0 + tx;
      a_s[ty * kTileK + tx] = (b < B && k < K) ? acc_t(A[b * lda + k]) : acc_t(0);
    }
    for (int e = tid; e < kGates * kTileJ * kTileK; e += kThreads) {
      const int g = e / (kTileJ * kTileK), jj = (e / kTileK) % kTileJ, kk = e % kTileK;
      const int j = j0 + jj, k = k0 + kk;
#ifdef GRU_FAULT_OFF_BY_ONE  // sanitizer self-test only: reads one past the row's end
      const bool in = j < H && k <= K;
#else
      const bool in = j < H && k < K;
#endif
      w_s[(g * kTileJ + jj) * (kTileK + 1) + kk] =
          in ? acc_t(W[(int64_t)(g * H + j) * K + k]) : acc_t(0);
    }
    __syncthreads();
    for (int kk = 0; kk < kTileK; ++kk) {
      const acc_t a = a_s[ty * kTileK + kk];
      for (int g = 0; g < kGates; ++g) acc[g] += a * w_s[(g * kTileJ + tx) * (kTileK + 1) + kk];
    }
#ifndef GRU_FAULT_MISSING_BARRIER  // sanitizer self-test only: next stage overwrites a tile in use
    __syncthreads();
#endif
  }
}

// acc = sum_{k < K} A[b, k] W[k, j]  for the thread's (b, j): the backward's dG W, W
// given by rows k of row stride H. smem: A tile [kTileB][kTileK], W tile [kTileK][kTileJ].
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t matmul_w_cols(const scalar_t* __restrict__ A, int64_t lda,
                                               const scalar_t* __restrict__ W, int H, int B,
                                               int K, int b0, int j0, acc_t* smem) {
  acc_t* a_s = smem;
  acc_t* w_s = smem + kTileB * kTileK;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTileJ + tx;
  acc_t acc = acc_t(0);
  for (int k0 = 0; k0 < K; k0 += kTileK) {
    {
      const int b = b0 + ty, k = k0 + tx;
      a_s[ty * kTileK + tx] = (b < B && k < K) ? acc_t(A[b * lda + k]) : acc_t(0);
    }
    for (int e = tid; e < kTileK * kTileJ; e += kThreads) {
      const int kk = e / kTileJ, jj = e % kTileJ, k = k0 + kk, j = j0 + jj;
      w_s[kk * kTileJ + jj] = (k < K && j < H) ? acc_t(W[(int64_t)k * H + j]) : acc_t(0);
    }
    __syncthreads();
    for (int kk = 0; kk < kTileK; ++kk) acc += a_s[ty * kTileK + kk] * w_s[kk * kTileJ + tx];
    __syncthreads();
  }
  return acc;
}

enum class ForwardPhase { kFused, kResetUpdate, kCandidate };

// Step i of the forward. kFused: reset_after's whole step. kResetUpdate, kCandidate:
// reset_before's two launches (the candidate's matmul needs r h of every unit).
template <typename scalar_t, typename acc_t, bool kResetAfter, ForwardPhase kPhase>
__global__ void forward_step_kernel(ForwardParams<scalar_t> p, int i) {
  using Cell = GruCell<acc_t, kResetAfter>;
  GRU_DYNAMIC_SMEM(acc_t, smem);
  const int B = p.B, H = p.H;
  const int t = step_of(i, p.T, p.reverse);
  const int b0 = blockIdx.y * kTileB, j0 = blockIdx.x * kTileJ;
  const int b = b0 + threadIdx.y, j = j0 + threadIdx.x;
  const scalar_t* hp = i == 0 ? p.hx : p.output + (int64_t)step_of(i - 1, p.T, p.reverse) * B * H;
  const int64_t slot = (int64_t)p.T * B * H;
  const int64_t e = ((int64_t)t * B + b) * H + j;  // (t, b, j) in [T, B, H]
  scalar_t* ws = p.workspace;
  const scalar_t* gib = p.gi + ((int64_t)t * B + b) * 3 * H;

  if constexpr (kPhase == ForwardPhase::kFused) {
    acc_t gh[3];
    matmul_w_rows<3>(hp, H, p.w_hh, H, B, H, b0, j0, gh, smem);
    if (b >= B || j >= H) return;
    acc_t r, z, hn = gh[kGateN] + (p.b_hn ? acc_t(p.b_hn[j]) : acc_t(0));
    Cell::gates_rz(acc_t(gib[kGateR * H + j]), acc_t(gib[kGateZ * H + j]), gh[kGateR],
                   gh[kGateZ], r, z);
    acc_t n = Cell::candidate(acc_t(gib[kGateN * H + j]), hn, r);
    if (p.lengths && t >= p.lengths[b]) Cell::padded(r, z, n, hn);
    p.output[e] = scalar_t(Cell::update(z, n, acc_t(hp[(int64_t)b * H + j])));
    ws[kSlotR * slot + e] = scalar_t(r);
    ws[kSlotZ * slot + e] = scalar_t(z);
    ws[kSlotN * slot + e] = scalar_t(n);
    ws[kSlotHn * slot + e] = scalar_t(hn);
  } else if constexpr (kPhase == ForwardPhase::kResetUpdate) {
    acc_t gh[2];
    matmul_w_rows<2>(hp, H, p.w_hh, H, B, H, b0, j0, gh, smem);
    if (b >= B || j >= H) return;
    acc_t r, z;
    Cell::gates_rz(acc_t(gib[kGateR * H + j]), acc_t(gib[kGateZ * H + j]), gh[kGateR],
                   gh[kGateZ], r, z);
    ws[kSlotR * slot + e] = scalar_t(r);
    ws[kSlotZ * slot + e] = scalar_t(z);
    ws[kSlotHn * slot + e] = scalar_t(r * acc_t(hp[(int64_t)b * H + j]));
  } else {
    // The r h of every unit of the step, written by the kResetUpdate launch.
    const scalar_t* rh = ws + kSlotHn * slot + (int64_t)t * B * H;
    acc_t gh[1];
    matmul_w_rows<1>(rh, H, p.w_hh + (int64_t)kGateN * H * H, H, B, H, b0, j0, gh, smem);
    if (b >= B || j >= H) return;
    acc_t r = acc_t(ws[kSlotR * slot + e]), z = acc_t(ws[kSlotZ * slot + e]);
    acc_t n = Cell::candidate(acc_t(gib[kGateN * H + j]), gh[0], r);
    // Other blocks are still reading r h: a padded step leaves that slot alone (its
    // gradients are zero whatever it holds).
    acc_t unused_hn;
    if (p.lengths && t >= p.lengths[b]) Cell::padded(r, z, n, unused_hn);
    p.output[e] = scalar_t(Cell::update(z, n, acc_t(hp[(int64_t)b * H + j])));
    ws[kSlotR * slot + e] = scalar_t(r);
    ws[kSlotZ * slot + e] = scalar_t(z);
    ws[kSlotN * slot + e] = scalar_t(n);
  }
}

enum class BackwardPhase { kGates, kResetGate, kFinal };

// Step i of the backward (i runs from T-1 down to 0), or the final grad_hx launch.
// kGates: dh = dy_t + dh_direct + (dGh of the step processed before) W_hh, then the gate
//         gradients (reset_before: all but dr).
// kResetGate (reset_before): g = dn W_hn over all units, then dr and g r into dh_direct.
// kFinal: grad_hx = dh_direct + (dGh of the last step processed) W_hh.
template <typename scalar_t, typename acc_t, bool kResetAfter, BackwardPhase kPhase>
__global__ void backward_step_kernel(BackwardParams<scalar_t, acc_t> p, int i) {
  using Cell = GruCell<acc_t, kResetAfter>;
  GRU_DYNAMIC_SMEM(acc_t, smem);
  const int B = p.B, H = p.H, G = 3 * H;
  const int b0 = blockIdx.y * kTileB, j0 = blockIdx.x * kTileJ;
  const int b = b0 + threadIdx.y, j = j0 + threadIdx.x;
  const bool in_range = b < B && j < H;
  const int64_t bj = (int64_t)b * H + j;
  // The recurrent matmul's operand: reset_after uses all of dGh; reset_before only the
  // r, z columns of dG (the candidate's share went through g = dn W_hn already).
  const int K = kResetAfter ? G : 2 * H;

  if constexpr (kPhase == BackwardPhase::kFinal) {
    const int t0 = step_of(0, p.T, p.reverse);
    const acc_t rec = matmul_w_cols(p.dGh + (int64_t)t0 * B * G, G, p.w_hh, H, B, K, b0, j0, smem);
    if (in_range) p.grad_hx[bj] = scalar_t(p.dh_direct[bj] + rec);
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
      if (in_range) dh_next = acc_t(p.grad_h_n[bj]);
    } else {  // block-uniform branch: every thread takes part in the matmul
      const int t_next = step_of(i + 1, p.T, p.reverse);
      dh_next = matmul_w_cols(p.dGh + (int64_t)t_next * B * G, G, p.w_hh, H, B, K, b0, j0, smem);
      if (in_range) dh_next += p.dh_direct[bj];
    }
    if (!in_range) return;
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
  } else {  // kResetGate
    const acc_t g = matmul_w_cols(p.dG + (int64_t)t * B * G + kGateN * H, G,
                                  p.w_hh + (int64_t)kGateN * H * H, H, B, H, b0, j0, smem);
    if (!in_range) return;
    acc_t dr, dh_prev = p.dh_direct[bj];
    Cell::reset_before_dr(g, acc_t(ws[kSlotR * slot + e]), acc_t(hp[bj]), dr, dh_prev);
    dGb[kGateR * H + j] = scalar_t(dr);
    p.dh_direct[bj] = dh_prev;
  }
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

inline dim3 grid_for(int B, int H) { return dim3(ceil_div(H, kTileJ), ceil_div(B, kTileB)); }

// The forward step loop: T launches (2T for reset_before) on one stream, no host sync.
template <typename scalar_t, typename acc_t, bool kResetAfter>
void forward_steps(const ForwardParams<scalar_t>& p, gru_stream_t stream) {
  const dim3 grid = grid_for(p.B, p.H), block(kTileJ, kTileB);
  for (int i = 0; i < p.T; ++i) {
    if constexpr (kResetAfter) {
      auto* fused = &forward_step_kernel<scalar_t, acc_t, true, ForwardPhase::kFused>;
      GRU_LAUNCH(fused, grid, block, rows_smem_bytes<acc_t>(3), stream, p, i);
    } else {
      auto* rz = &forward_step_kernel<scalar_t, acc_t, false, ForwardPhase::kResetUpdate>;
      auto* cand = &forward_step_kernel<scalar_t, acc_t, false, ForwardPhase::kCandidate>;
      GRU_LAUNCH(rz, grid, block, rows_smem_bytes<acc_t>(2), stream, p, i);
      GRU_LAUNCH(cand, grid, block, rows_smem_bytes<acc_t>(1), stream, p, i);
    }
  }
}

// The backward step loop: T launches (2T for reset_before) plus one for grad_hx.
template <typename scalar_t, typename acc_t, bool kResetAfter>
void backward_steps(const BackwardParams<scalar_t, acc_t>& p, gru_stream_t stream) {
  const dim3 grid = grid_for(p.B, p.H), block(kTileJ, kTileB);
  const size_t smem = cols_smem_bytes<acc_t>();
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
