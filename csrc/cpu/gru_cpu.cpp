// CPU backend: the step loops, the one-hot shortcuts (OneHotOps) and the kernels.
//
// The batch is cut into blocks, one per thread, and each block runs every step on its
// own rows: per step one BLAS GEMM for the recurrent matmul (two for reset_before, whose
// candidate needs r first) into preallocated buffers, then a vectorized pass over the
// gates. No allocation inside the loop; BLAS is called directly (no dispatcher, no
// tensor views per step).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers only (gru_driver.cpp)
#ifndef AT_PER_OPERATOR_HEADERS
#define AT_PER_OPERATOR_HEADERS
#endif

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "gru.h"
#include "gru_math.h"

// The Fortran BLAS that torch's CPU library links (MKL, OpenBLAS). Weak, so a torch
// without them still loads this extension and takes the ATen fallback below.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace gru_fused {
namespace {

// Row-major C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, where op transposes when
// asked and ld* are row strides. Column-major BLAS sees the same memory transposed, so
// it computes C^T = op(B)^T op(A)^T. beta == 0 ignores C's old contents (NaN included).
template <typename acc_t>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha,
          const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb, acc_t beta, acc_t* C,
          int64_t ldc) {
  static_assert(std::is_same_v<acc_t, float> || std::is_same_v<acc_t, double>);
  auto* blas = [] {
    if constexpr (std::is_same_v<acc_t, float>) return sgemm_;
    else return dgemm_;
  }();
  if (blas != nullptr) {
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int mi = n, ni = m, ki = k, la = ldb, lb = lda, lc = ldc;
    blas(&ta, &tb, &mi, &ni, &ki, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  auto a = at::from_blob(const_cast<acc_t*>(A), {trans_a ? k : m, trans_a ? m : k}, {lda, 1}, opts);
  auto b = at::from_blob(const_cast<acc_t*>(B), {trans_b ? n : k, trans_b ? k : n}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  c.addmm_(trans_a ? a.t() : a, trans_b ? b.t() : b, beta, alpha);
}

template <typename T>
using acc_of = at::opmath_type<T>;

// GEMM operands in acc_t: the pointer itself when scalar_t is acc_t, else a converted
// copy in a buffer allocated before the step loop (bfloat16/half run their GEMMs in
// float, more accurate than PyTorch's own reduced-precision matmuls).
template <typename scalar_t>
const acc_of<scalar_t>* as_acc(const scalar_t* p, int64_t count, acc_of<scalar_t>* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_of<scalar_t>>) {
    return p;
  } else {
    for (int64_t e = 0; e < count; ++e) buf[e] = p[e];
    return buf;
  }
}

// A buffer of count acc_t values when scalar_t needs staging, else empty.
template <typename scalar_t>
at::Tensor staging(int64_t count) {
  using acc_t = acc_of<scalar_t>;
  const bool needed = !std::is_same_v<scalar_t, acc_t>;
  return at::empty({needed ? count : 0}, at::dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// The gate passes below are compiled for AVX-512, AVX2 and baseline x86-64, and the
// loader picks the widest the CPU supports. Every clone computes the same bits: the
// float math (FastMathF) is plain IEEE adds, multiplies, divides and selects, and
// setup.py turns off floating-point contraction, so no clone fuses a multiply-add.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GRU_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GRU_SIMD_CLONES
#endif

// Before a gate pass's loop over units: its iterations are independent (rows of
// different buffers never overlap), so the compiler may vectorize without runtime
// alias checks. Unlike `omp simd`, this keeps the cell's by-reference outputs plain
// locals, which GCC then vectorizes for every dtype.
#if defined(__clang__)
#define GRU_VECTORIZE_LOOP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define GRU_VECTORIZE_LOOP _Pragma("GCC ivdep")
#else
#define GRU_VECTORIZE_LOOP
#endif

// sigmoid/tanh for the step loops: the vectorizable FastMathF for float (which is also
// the accumulate type of bfloat16 and half), libm for double so float64 gradcheck sees
// exact derivatives.
template <typename acc_t>
using CpuMath = std::conditional_t<std::is_same_v<acc_t, float>, FastMathF, Math<acc_t>>;

template <typename acc_t, bool kResetAfter>
using CpuCell = GruCell<acc_t, kResetAfter, CpuMath<acc_t>>;

// Runs fn(b0, b1) on blocks of batch rows [b0, b1), one block per thread. Row b's
// recurrence reads only row b, so a block runs the whole step loop on its own: one
// parallel region per call and no synchronisation per step, each thread's GEMMs
// sized for one core (MKL runs single-threaded inside a parallel region). But every
// block streams all of W_hh each step, which pays while W_hh stays in a core's cache
// (weight_bytes up to 1 MiB, H <= 295 in float), or while each block has rows enough
// to do 8 flops per weight byte it streams (16 rows or more a thread; at B = 128,
// H = 1024 on 2 cores, 10% faster than MKL's threaded GEMMs, which meet at a barrier
// every step). Otherwise one block runs on the calling thread, where MKL splits each
// GEMM's columns across threads (each reads its share of W_hh) and the gate passes
// split across threads too. Blocks are made of 4-row units, the last taking the 1 to
// 3 rows left over: MKL gives a row the same bits in any GEMM of 4 or more rows, so how
// the batch is split does not change the results.
template <typename F>
void for_each_batch_block(int64_t B, int64_t weight_bytes, const F& fn) {
  constexpr int64_t kRows = 4, kMaxCachedWeightBytes = int64_t(1) << 20, kMinStreamingRows = 16;
  const int64_t threads = at::get_num_threads();
  if (weight_bytes > kMaxCachedWeightBytes && B < kMinStreamingRows * threads) {
    fn(0, B);
    return;
  }
  const int64_t units = std::max<int64_t>(1, B / kRows);
  at::parallel_for(0, units, 1, [&](int64_t k0, int64_t k1) {
    fn(k0 * kRows, k1 == units ? B : k1 * kRows);
  });
}

// Runs fn(b, j_begin, j_end) over the elements of rows [b0, b1) x units [0, H) of a
// step, split into contiguous row segments across threads when called outside a
// parallel region (else inline). An element's bits are the same whichever segment
// (and vector lane) computes it.
template <typename F>
void for_each_row_segment(int64_t b0, int64_t b1, int64_t H, int64_t grain, const F& fn) {
  at::parallel_for(b0 * H, b1 * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end;) {
      const int64_t b = idx / H, j0 = idx % H;
      const int64_t j1 = std::min<int64_t>(H, j0 + (end - idx));
      fn(b, j0, j1);
      idx += j1 - j0;
    }
  });
}

// Elements per task before a gate pass is split across threads: about 20 us of work.
// The forward's three transcendentals cost more per element than the backward.
constexpr int64_t kForwardGrain = 8192;
constexpr int64_t kBackwardGrain = 16384;

// One forward step as the gate passes see it. [B, 3H] buffers hold gates r, z, n side
// by side in each row; [B, H] buffers are indexed b * H + j.
template <typename scalar_t>
struct ForwardStep {
  using acc_t = acc_of<scalar_t>;
  int64_t H;
  const scalar_t* gi;      // [B, 3H] x W_ih^T + folded biases; with gi_rows, the table
  const int64_t* gi_rows;  // [B] or nullptr: row b of gi is table row gi_rows[b]
  acc_t* gh;               // [B, 3H] recurrent pre-activations (reset_before: r, z, then n);
                           //         reset_after overwrites its r, z columns with r, z
  const scalar_t* b_hn;    // [H]     added to W_hn h (reset_after; zeros without bias)
  const scalar_t* h_prev;  // [B, H]
  const int64_t* lengths;  // [B] or nullptr
  int64_t t;
  scalar_t* h;             // [B, H] out: h_t
  scalar_t* r;             // [B, H] out: workspace slots of step t
  scalar_t* z;
  scalar_t* n;
  scalar_t* hn;
  bool active(int64_t b) const { return lengths == nullptr || t < lengths[b]; }
  // Row b's [H] column of gate g in gi and in gh.
  const scalar_t* gi_gate(int64_t b, int g) const {
    return gi + ((gi_rows ? gi_rows[b] : b) * kNumGates + g) * H;
  }
  acc_t* gh_gate(int64_t b, int g) const { return gh + (b * kNumGates + g) * H; }
};

// A padded step of row b (t >= lengths[b]), units [j0, j1): the state carries over and
// the slots get the cell's padded values (kSlotHn too when write_hn).
template <typename scalar_t, bool kResetAfter>
void forward_rows_padded(const ForwardStep<scalar_t>& s, int64_t b, int64_t j0, int64_t j1,
                         bool write_hn) {
  using acc_t = acc_of<scalar_t>;
  using Cell = CpuCell<acc_t, kResetAfter>;
  const int64_t o = b * s.H;
  const scalar_t* hp = s.h_prev + o;
  scalar_t *h = s.h + o, *rs = s.r + o, *zs = s.z + o, *ns = s.n + o, *hns = s.hn + o;
  for (int64_t j = j0; j < j1; ++j) {
    acc_t r, z, n, hn;
    Cell::padded(r, z, n, hn);
    h[j] = Cell::update(z, n, acc_t(hp[j]));
    rs[j] = r, zs[j] = z, ns[j] = n;
    if (write_hn) hns[j] = hn;
  }
}

// reset_after: the whole step for row b, units [j0, j1).
template <typename scalar_t>
GRU_SIMD_CLONES void forward_rows_reset_after(const ForwardStep<scalar_t>& s, int64_t b,
                                              int64_t j0, int64_t j1) {
  using acc_t = acc_of<scalar_t>;
  using Cell = CpuCell<acc_t, true>;
  const int64_t H = s.H, o = b * H;
  const scalar_t *gi_r = s.gi_gate(b, kGateR), *gi_z = s.gi_gate(b, kGateZ);
  const scalar_t* gi_n = s.gi_gate(b, kGateN);
  acc_t *gh_r = s.gh_gate(b, kGateR), *gh_z = s.gh_gate(b, kGateZ);
  const acc_t* gh_n = s.gh_gate(b, kGateN);
  const scalar_t* b_hn = s.b_hn;
  const scalar_t* hp = s.h_prev + o;
  scalar_t *h = s.h + o, *rs = s.r + o, *zs = s.z + o, *ns = s.n + o, *hns = s.hn + o;
  if (!s.active(b)) {
    forward_rows_padded<scalar_t, true>(s, b, j0, j1, /*write_hn=*/true);
    return;
  }
  // Two passes: r, z first (into gh's r, z columns, which the step no longer needs),
  // then n and h'. One pass chains three exp/divide latencies per element, too long
  // for the out-of-order window to overlap many elements; two shorter loops run about
  // 1.5x faster.
  GRU_VECTORIZE_LOOP
  for (int64_t j = j0; j < j1; ++j) {
    acc_t r, z;
    Cell::gates_rz(acc_t(gi_r[j]), acc_t(gi_z[j]), gh_r[j], gh_z[j], r, z);
    gh_r[j] = r, gh_z[j] = z;
  }
  GRU_VECTORIZE_LOOP
  for (int64_t j = j0; j < j1; ++j) {
    const acc_t r = gh_r[j], z = gh_z[j];
    const acc_t hn = gh_n[j] + acc_t(b_hn[j]);
    const acc_t n = Cell::candidate(acc_t(gi_n[j]), hn, r);
    h[j] = Cell::update(z, n, acc_t(hp[j]));
    rs[j] = r, zs[j] = z, ns[j] = n, hns[j] = hn;
  }
}

// reset_before, before the candidate's matmul: r, z and r h (into the kSlotHn slot).
template <typename scalar_t>
GRU_SIMD_CLONES void forward_rows_reset_update(const ForwardStep<scalar_t>& s, int64_t b,
                                               int64_t j0, int64_t j1) {
  using acc_t = acc_of<scalar_t>;
  using Cell = CpuCell<acc_t, false>;
  const int64_t H = s.H, o = b * H;
  const scalar_t *gi_r = s.gi_gate(b, kGateR), *gi_z = s.gi_gate(b, kGateZ);
  const acc_t *gh_r = s.gh_gate(b, kGateR), *gh_z = s.gh_gate(b, kGateZ);
  const scalar_t* hp = s.h_prev + o;
  scalar_t *rs = s.r + o, *zs = s.z + o, *hns = s.hn + o;
  GRU_VECTORIZE_LOOP
  for (int64_t j = j0; j < j1; ++j) {
    acc_t r, z;
    Cell::gates_rz(acc_t(gi_r[j]), acc_t(gi_z[j]), gh_r[j], gh_z[j], r, z);
    rs[j] = r, zs[j] = z;
    hns[j] = r * acc_t(hp[j]);
  }
}

// reset_before, after the candidate's matmul (gh_n = W_hn (r h) + b_hn): n and h_t.
template <typename scalar_t>
GRU_SIMD_CLONES void forward_rows_candidate(const ForwardStep<scalar_t>& s, int64_t b,
                                            int64_t j0, int64_t j1) {
  using acc_t = acc_of<scalar_t>;
  using Cell = CpuCell<acc_t, false>;
  const int64_t H = s.H, o = b * H;
  const scalar_t* gi_n = s.gi_gate(b, kGateN);
  const acc_t* gh_n = s.gh_gate(b, kGateN);
  const scalar_t* hp = s.h_prev + o;
  scalar_t *h = s.h + o, *rs = s.r + o, *zs = s.z + o, *ns = s.n + o;
  if (!s.active(b)) {
    // A padded step keeps r h in its slot, as the CUDA kernel must (its gradient
    // contributions are zero whatever the slot holds).
    forward_rows_padded<scalar_t, false>(s, b, j0, j1, /*write_hn=*/false);
    return;
  }
  GRU_VECTORIZE_LOOP
  for (int64_t j = j0; j < j1; ++j) {
    const acc_t n = Cell::candidate(acc_t(gi_n[j]), gh_n[j], acc_t(rs[j]));
    h[j] = Cell::update(acc_t(zs[j]), n, acc_t(hp[j]));
    ns[j] = n;
  }
}

template <typename scalar_t, bool kResetAfter>
void forward_loop(const ForwardLoopArgs& a) {
  using acc_t = acc_of<scalar_t>;
  const int64_t T = a.output.size(0), B = a.output.size(1), H = a.hx.size(1), G = 3 * H;
  const scalar_t* gi = a.gi.data_ptr<scalar_t>();
  const int64_t* gi_rows = a.gi_rows.defined() ? a.gi_rows.data_ptr<int64_t>() : nullptr;
  const scalar_t* hx = a.hx.data_ptr<scalar_t>();
  scalar_t* out = a.output.data_ptr<scalar_t>();
  scalar_t* ws = a.workspace.data_ptr<scalar_t>();
  // Strides between workspace slots and between steps: gru_inference's workspace holds
  // one step, which every step overwrites.
  const int64_t slot = a.workspace.size(1) * B * H;
  const int64_t ws_step = a.workspace.size(1) == T ? B * H : 0;
  // Everything the loop writes besides its outputs is allocated here, once.
  at::Tensor gh_buf = at::empty({B, G}, at::dtype(c10::CppTypeToScalarType<acc_t>::value));
  at::Tensor w_buf = staging<scalar_t>(G * H), h_buf = staging<scalar_t>(B * H);
  // b_hn is read unconditionally by the vector loop: zeros stand in for a missing bias.
  at::Tensor b_hn = kResetAfter && !a.b_hn.defined() ? at::zeros({H}, a.hx.options()) : a.b_hn;
  acc_t* gh = gh_buf.data_ptr<acc_t>();  // [B, 3H] recurrent pre-activations of the step
  const acc_t* W = as_acc(a.weight_hh.data_ptr<scalar_t>(), G * H, w_buf.data_ptr<acc_t>());
  acc_t* hbuf = h_buf.data_ptr<acc_t>();

  for_each_batch_block(B, G * H * int64_t(sizeof(acc_t)), [&](int64_t b0, int64_t b1) {
    const int64_t rows = b1 - b0;
    ForwardStep<scalar_t> s;  // pointers to row 0 of each [B, .] buffer of the step
    s.H = H;
    s.gh = gh;
    s.b_hn = kResetAfter ? b_hn.data_ptr<scalar_t>() : nullptr;
    s.lengths = a.lengths.defined() ? a.lengths.data_ptr<int64_t>() : nullptr;
    for (int64_t i = a.iter_begin; i < a.iter_end; ++i) {
      const int64_t t = step_at(i, T, a.reverse);
      const scalar_t* hp = i == 0 ? hx : out + step_at(i - 1, T, a.reverse) * B * H;
      s.t = t;
      s.gi = gi_rows ? gi : gi + (t - a.step0) * B * G;
      s.gi_rows = gi_rows ? gi_rows + t * B : nullptr;
      s.h_prev = hp;
      s.h = out + t * B * H;
      s.r = ws + kSlotR * slot + t * ws_step;
      s.z = ws + kSlotZ * slot + t * ws_step;
      s.n = ws + kSlotN * slot + t * ws_step;
      s.hn = ws + kSlotHn * slot + t * ws_step;
      // This block's rows of h_prev [B, H] and gh [B, 3H].
      const acc_t* hp_rows = as_acc(hp + b0 * H, rows * H, hbuf + b0 * H);
      acc_t* gh_rows = gh + b0 * G;

      if constexpr (kResetAfter) {
        // gh[B, 3H] = h_prev[B, H] W_hh^T
        gemm<acc_t>(false, true, rows, G, H, 1, hp_rows, H, W, H, 0, gh_rows, G);
        for_each_row_segment(b0, b1, H, kForwardGrain, [&](int64_t b, int64_t j0, int64_t j1) {
          forward_rows_reset_after(s, b, j0, j1);
        });
      } else {
        // gh[:, r|z] = h_prev W_hr|hz^T; then r h; then gh[:, n] = (r h) W_hn^T.
        gemm<acc_t>(false, true, rows, 2 * H, H, 1, hp_rows, H, W, H, 0, gh_rows, G);
        for_each_row_segment(b0, b1, H, kForwardGrain, [&](int64_t b, int64_t j0, int64_t j1) {
          forward_rows_reset_update(s, b, j0, j1);
        });
        gemm<acc_t>(false, true, rows, H, H, 1, as_acc(s.hn + b0 * H, rows * H, hbuf + b0 * H),
                    H, W + kGateN * H * H, H, 0, gh_rows + kGateN * H, G);
        for_each_row_segment(b0, b1, H, kForwardGrain, [&](int64_t b, int64_t j0, int64_t j1) {
          forward_rows_candidate(s, b, j0, j1);
        });
      }
    }
  });
}

// One backward step as the gate passes see it; layouts as in ForwardStep.
template <typename scalar_t>
struct BackwardStep {
  using acc_t = acc_of<scalar_t>;
  int64_t H;
  const scalar_t* grad_out;  // [B, H] dL/dh_t through output[t]
  const scalar_t* r;         // [B, H] workspace slots of step t
  const scalar_t* z;
  const scalar_t* n;
  const scalar_t* hn;
  const scalar_t* h_prev;    // [B, H]
  acc_t* dh;                 // [B, H] in: dL/dh_t from later steps; out: dL/dh_prev's
                             //        direct share (through z, and g r for reset_before)
  const acc_t* g;            // [B, H] reset_before's dn W_hn
  scalar_t* dG;              // [B, 3H] out: dL/dgi
  scalar_t* dGh;             // [B, H]  out: dL/dgh's candidate column (reset_after); the
                             //        driver needs no other
  acc_t* d_rec;              // [B, 3H] out: dL/dgh (reset_after), the operand of the step's
                             //        recurrent GEMM: cache-resident, reused every step
};

// The gate gradients of row b, units [j0, j1) (reset_before: all but dr).
template <typename scalar_t, bool kResetAfter>
GRU_SIMD_CLONES void backward_rows(const BackwardStep<scalar_t>& s, int64_t b, int64_t j0,
                                   int64_t j1) {
  using acc_t = acc_of<scalar_t>;
  using Cell = CpuCell<acc_t, kResetAfter>;
  const int64_t H = s.H, o = b * H;
  const scalar_t *go = s.grad_out + o, *rs = s.r + o, *zs = s.z + o, *ns = s.n + o;
  const scalar_t *hns = s.hn + o, *hp = s.h_prev + o;
  acc_t* dh = s.dh + o;
  scalar_t* dG_r = s.dG + b * kNumGates * H + kGateR * H;
  scalar_t* dG_z = dG_r + (kGateZ - kGateR) * H;
  scalar_t* dG_n = dG_r + (kGateN - kGateR) * H;
  scalar_t* dGh_n = s.dGh + o;
  acc_t* rec_r = s.d_rec + b * kNumGates * H + kGateR * H;
  acc_t* rec_z = rec_r + (kGateZ - kGateR) * H;
  acc_t* rec_n = rec_r + (kGateN - kGateR) * H;
  GRU_VECTORIZE_LOOP
  for (int64_t j = j0; j < j1; ++j) {
    acc_t dr, dz, dn, dgh_n, dh_prev;
    Cell::backward(acc_t(go[j]) + dh[j], acc_t(rs[j]), acc_t(zs[j]), acc_t(ns[j]),
                   acc_t(hp[j]), acc_t(hns[j]), dr, dz, dn, dgh_n, dh_prev);
    dG_r[j] = dr, dG_z[j] = dz, dG_n[j] = dn;
    if constexpr (kResetAfter) {
      dGh_n[j] = dgh_n;
      rec_r[j] = dr, rec_z[j] = dz, rec_n[j] = dgh_n;
    }
    dh[j] = dh_prev;
  }
}

// reset_before, once g = dn W_hn is known: dr and g's share of dL/dh_prev.
template <typename scalar_t>
GRU_SIMD_CLONES void backward_rows_reset_gate(const BackwardStep<scalar_t>& s, int64_t b,
                                              int64_t j0, int64_t j1) {
  using acc_t = acc_of<scalar_t>;
  using Cell = CpuCell<acc_t, false>;
  const int64_t H = s.H, o = b * H;
  const scalar_t *rs = s.r + o, *hp = s.h_prev + o;
  const acc_t* g = s.g + o;
  acc_t* dh = s.dh + o;
  scalar_t* dG_r = s.dG + b * kNumGates * H + kGateR * H;
  GRU_VECTORIZE_LOOP
  for (int64_t j = j0; j < j1; ++j) {
    acc_t dr, dh_prev = dh[j];
    Cell::reset_before_dr(g[j], acc_t(rs[j]), acc_t(hp[j]), dr, dh_prev);
    dG_r[j] = dr;
    dh[j] = dh_prev;
  }
}

template <typename scalar_t, bool kResetAfter>
void backward_loop(const BackwardLoopArgs& a) {
  using acc_t = acc_of<scalar_t>;
  const int64_t T = a.output.size(0), B = a.output.size(1), H = a.output.size(2), G = 3 * H;
  const scalar_t* go = a.grad_output.data_ptr<scalar_t>();
  const scalar_t* hx = a.hx.data_ptr<scalar_t>();
  const scalar_t* out = a.output.data_ptr<scalar_t>();
  const scalar_t* ws = a.workspace.data_ptr<scalar_t>();
  scalar_t* dG = a.dG.data_ptr<scalar_t>();
  scalar_t* dGh = a.dGh.data_ptr<scalar_t>();
  const int64_t slot = T * B * H;
  const auto acc_dtype = at::dtype(c10::CppTypeToScalarType<acc_t>::value);
  // dhp [B, H]: dL/dh_prev accumulated for the next step to process; starts as dL/dh_n
  // and is carried from chunk to chunk in a.dh.
  const at::Tensor& dhp_buf = a.dh;
  if (a.iter_end == T) dhp_buf.copy_(a.grad_h_n);
  at::Tensor g_buf = at::empty({kResetAfter ? 0 : B * H}, acc_dtype);
  at::Tensor rec_buf = at::empty({kResetAfter ? B * G : 0}, acc_dtype);
  at::Tensor w_buf = staging<scalar_t>(G * H);
  at::Tensor d_buf = staging<scalar_t>(kResetAfter ? 0 : B * G);
  acc_t* dhp = dhp_buf.data_ptr<acc_t>();
  acc_t* g = g_buf.data_ptr<acc_t>();
  const acc_t* W = as_acc(a.weight_hh.data_ptr<scalar_t>(), G * H, w_buf.data_ptr<acc_t>());
  acc_t* dbuf = d_buf.data_ptr<acc_t>();

  for_each_batch_block(B, G * H * int64_t(sizeof(acc_t)), [&](int64_t b0, int64_t b1) {
    const int64_t rows = b1 - b0;
    BackwardStep<scalar_t> s;  // pointers to row 0 of each [B, .] buffer of the step
    s.H = H;
    s.dh = dhp;
    s.g = g;
    s.d_rec = rec_buf.data_ptr<acc_t>();
    for (int64_t i = a.iter_end - 1; i >= a.iter_begin; --i) {
      const int64_t t = step_at(i, T, a.reverse);
      s.h_prev = i == 0 ? hx : out + step_at(i - 1, T, a.reverse) * B * H;
      s.grad_out = go + t * B * H;
      s.r = ws + kSlotR * slot + t * B * H;
      s.z = ws + kSlotZ * slot + t * B * H;
      s.n = ws + kSlotN * slot + t * B * H;
      s.hn = ws + kSlotHn * slot + t * B * H;
      s.dG = dG + (t - a.step0) * B * G;
      s.dGh = dGh + (t - a.step0) * B * H;
      // This block's rows of dhp [B, H], g [B, H] and the step's [B, 3H] gradients.
      acc_t* dhp_rows = dhp + b0 * H;

      for_each_row_segment(b0, b1, H, kBackwardGrain, [&](int64_t b, int64_t j0, int64_t j1) {
        backward_rows<scalar_t, kResetAfter>(s, b, j0, j1);
      });
      if constexpr (kResetAfter) {
        // dhp[B, H] += dGh_t[B, 3H] W_hh[3H, H]
        gemm<acc_t>(false, false, rows, H, G, 1, s.d_rec + b0 * G, G, W, H, 1, dhp_rows, H);
      } else {
        // g[B, H] = dn[B, H] W_hn[H, H]; then dr and g's share of dhp; then the r, z GEMM.
        const acc_t* d = as_acc(s.dG + b0 * G, rows * G, dbuf + b0 * G);
        gemm<acc_t>(false, false, rows, H, H, 1, d + kGateN * H, G, W + kGateN * H * H, H, 0,
                    g + b0 * H, H);
        for_each_row_segment(b0, b1, H, kBackwardGrain, [&](int64_t b, int64_t j0, int64_t j1) {
          backward_rows_reset_gate(s, b, j0, j1);
        });
        d = as_acc(s.dG + b0 * G, rows * G, dbuf + b0 * G);  // now with dr
        gemm<acc_t>(false, false, rows, H, 2 * H, 1, d, G, W, H, 1, dhp_rows, H);
      }
    }
  });
  if (a.iter_begin == 0) a.grad_hx.copy_(dhp_buf);
}

// OneHotColumns for CPU input (see gru.h): one branch-free pass per row, stopping at
// the first row that is not one-hot, so a dense input costs one row's reads.
at::Tensor one_hot_columns_cpu(const at::Tensor& input) {
  const int64_t I = input.size(2), rows = input.size(0) * input.size(1);
  if (I > std::numeric_limits<int32_t>::max()) return at::Tensor();  // int32 column below
  const at::Tensor x = input.contiguous();
  at::Tensor cols = at::empty({rows}, at::kLong);
  bool one_hot = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "gru_fused_one_hot_cpu", [&] {
    // Compared in acc_t, which holds every scalar_t value exactly (float for bfloat16
    // and half, double for double): 1 + 1e-9 or 1e-300 in float64 is not a 1 or a 0.
    using acc_t = acc_of<scalar_t>;
    const scalar_t* p = x.data_ptr<scalar_t>();
    int64_t* c = cols.data_ptr<int64_t>();
    for (int64_t row = 0; row < rows && one_hot; ++row, p += I) {
      int32_t ones = 0, others = 0, where = 0;
      GRU_VECTORIZE_LOOP
      for (int32_t k = 0; k < static_cast<int32_t>(I); ++k) {
        const acc_t v = static_cast<acc_t>(p[k]);
        const bool is_one = v == acc_t(1);
        ones += is_one;
        others += !is_one & (v != acc_t(0));  // NaN included
        where = is_one ? k : where;
      }
      one_hot = ones == 1 && others == 0;
      c[row] = where;
    }
  });
  return one_hot ? cols : at::Tensor();
}

// OneHotOps::grad_weight on the CPU: dW_ih [3H, I], column cols[r] += row r of dG2d, rows
// added in order. Threads split the 3H gate units, so every sum has the same order
// whatever the thread count.
at::Tensor one_hot_grad_weight_cpu(const at::Tensor& dG2d, const at::Tensor& cols, int64_t I) {
  const int64_t rows = dG2d.size(0), G = dG2d.size(1);
  at::Tensor dW_t = at::zeros({I, G}, dG2d.options());  // row c: column c of dW_ih
  const int64_t* c = cols.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dG2d.scalar_type(),
                                  "gru_fused_one_hot_grad_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* d = dG2d.data_ptr<scalar_t>();
    scalar_t* w = dW_t.data_ptr<scalar_t>();
    // Accumulate in acc_t: a float buffer for bfloat16/half, else w itself.
    at::Tensor acc_buf = staging<scalar_t>(I * G);
    acc_t* acc = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(w)
                                                  : acc_buf.zero_().data_ptr<acc_t>();
    at::parallel_for(0, G, 256, [&](int64_t j0, int64_t j1) {
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* dst = acc + c[r] * G;
        const scalar_t* src = d + r * G;
        GRU_VECTORIZE_LOOP
        for (int64_t j = j0; j < j1; ++j) dst[j] += acc_t(src[j]);
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        for (int64_t k = 0; k < I; ++k) {
          for (int64_t j = j0; j < j1; ++j) w[k * G + j] = acc[k * G + j];
        }
      }
    });
  });
  return dW_t.t().contiguous();
}

constexpr OneHotOps kOneHotCpu{&one_hot_columns_cpu, &one_hot_grad_weight_cpu};
// The one-hot shortcuts, steps in chunks, and dGh's n column alone (see gru.h).
const BackendExtras kCpuExtras{&kOneHotCpu, /*step_chunks=*/true, /*dgh_candidate_only=*/true};

void forward_loop_cpu(const ForwardLoopArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.gi.scalar_type(),
                                  "gru_fused_forward_cpu", [&] {
    if (a.reset_after) forward_loop<scalar_t, true>(a);
    else forward_loop<scalar_t, false>(a);
  });
}

void backward_loop_cpu(const BackwardLoopArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.dG.scalar_type(),
                                  "gru_fused_backward_cpu", [&] {
    if (a.reset_after) backward_loop<scalar_t, true>(a);
    else backward_loop<scalar_t, false>(a);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reset_after, bool reverse) {
  return gru_forward_impl(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                          reset_after, reverse, &forward_loop_cpu, kCpuExtras);
}

std::tuple<at::Tensor, at::Tensor> gru_inference_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reset_after, bool reverse) {
  auto [output, h_n, step_scratch] =
      gru_forward_impl(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                       reset_after, reverse, &forward_loop_cpu, kCpuExtras,
                       /*keep_workspace=*/false);
  return {output, h_n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                 const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
                 const at::Tensor& weight_hh, const at::Tensor& output,
                 const at::Tensor& workspace, const std::optional<at::Tensor>& lengths,
                 bool has_bias, bool reset_after, bool reverse,
                 std::array<bool, 6> output_mask) {
  return gru_backward_impl(grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output,
                           workspace, lengths, has_bias, reset_after, reverse, output_mask,
                           &backward_loop_cpu, kCpuExtras);
}

}  // namespace

TORCH_LIBRARY_IMPL(gru_fused, CPU, m) {
  m.impl("gru_forward", &gru_forward_cpu);
  m.impl("gru_inference", &gru_inference_cpu);
  m.impl("gru_backward", &gru_backward_cpu);
}

}  // namespace gru_fused
