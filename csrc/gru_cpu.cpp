// CPU backend: the step loops. Per step, one BLAS GEMM for the recurrent matmul (two
// for reset_before, whose candidate needs r first) into preallocated buffers, then one
// fused pass over the gates, parallel over batch x hidden. No allocation inside the
// loop; BLAS is called directly (no dispatcher, no tensor views per step).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// Runs fn(b, j_begin, j_end) over the B x H elements of a step, split into contiguous
// row segments across threads. Chunks are fixed by (B, H, threads), so results do not
// depend on scheduling: every element is computed by exactly one thread.
template <typename F>
void for_each_row_segment(int64_t B, int64_t H, const F& fn) {
  // Roughly 16k transcendental-heavy elements per task before threading pays off.
  constexpr int64_t kGrain = 16384;
  at::parallel_for(0, B * H, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end;) {
      const int64_t b = idx / H, j0 = idx % H;
      const int64_t j1 = std::min<int64_t>(H, j0 + (end - idx));
      fn(b, j0, j1);
      idx += j1 - j0;
    }
  });
}

template <typename scalar_t, bool kResetAfter>
void forward_loop(const ForwardLoopArgs& a) {
  using acc_t = acc_of<scalar_t>;
  using Cell = GruCell<acc_t, kResetAfter>;
  const int64_t T = a.gi.size(0), B = a.gi.size(1), H = a.hx.size(1), G = 3 * H;
  const scalar_t* gi = a.gi.data_ptr<scalar_t>();
  const scalar_t* hx = a.hx.data_ptr<scalar_t>();
  const scalar_t* b_hn = a.b_hn.defined() ? a.b_hn.data_ptr<scalar_t>() : nullptr;
  const int64_t* len = a.lengths.defined() ? a.lengths.data_ptr<int64_t>() : nullptr;
  scalar_t* out = a.output.data_ptr<scalar_t>();
  scalar_t* ws = a.workspace.data_ptr<scalar_t>();
  const int64_t slot = T * B * H;  // stride between workspace slots
  // Everything the loop writes besides its outputs is allocated here, once.
  at::Tensor gh_buf = at::empty({B, G}, at::dtype(c10::CppTypeToScalarType<acc_t>::value));
  at::Tensor w_buf = staging<scalar_t>(G * H), h_buf = staging<scalar_t>(B * H);
  acc_t* gh = gh_buf.data_ptr<acc_t>();  // [B, 3H] recurrent pre-activations of the step
  const acc_t* W = as_acc(a.weight_hh.data_ptr<scalar_t>(), G * H, w_buf.data_ptr<acc_t>());
  acc_t* hbuf = h_buf.data_ptr<acc_t>();

  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = step_at(i, T, a.reverse);
    const scalar_t* hp = i == 0 ? hx : out + step_at(i - 1, T, a.reverse) * B * H;  // [B, H]
    const scalar_t* gi_t = gi + t * B * G;                                             // [B, 3H]
    scalar_t* h_t = out + t * B * H;
    scalar_t* r_t = ws + kSlotR * slot + t * B * H;
    scalar_t* z_t = ws + kSlotZ * slot + t * B * H;
    scalar_t* n_t = ws + kSlotN * slot + t * B * H;
    scalar_t* hn_t = ws + kSlotHn * slot + t * B * H;
    const auto active = [&](int64_t b) { return len == nullptr || t < len[b]; };

    if constexpr (kResetAfter) {
      // gh[B, 3H] = h_prev[B, H] W_hh^T
      gemm<acc_t>(false, true, B, G, H, 1, as_acc(hp, B * H, hbuf), H, W, H, 0, gh, G);
      for_each_row_segment(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        const scalar_t* gib = gi_t + b * G;
        const acc_t* ghb = gh + b * G;
        const bool act = active(b);
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t e = b * H + j;
          acc_t r, z, n, hn = ghb[kGateN * H + j] + (b_hn ? acc_t(b_hn[j]) : acc_t(0));
          Cell::gates_rz(gib[kGateR * H + j], gib[kGateZ * H + j], ghb[kGateR * H + j],
                         ghb[kGateZ * H + j], r, z);
          n = Cell::candidate(gib[kGateN * H + j], hn, r);
          if (!act) Cell::padded(r, z, n, hn);
          h_t[e] = Cell::update(z, n, acc_t(hp[e]));
          r_t[e] = r;
          z_t[e] = z;
          n_t[e] = n;
          hn_t[e] = hn;
        }
      });
    } else {
      // gh[:, r|z] = h_prev W_hr|hz^T; then r h; then gh[:, n] = (r h) W_hn^T.
      gemm<acc_t>(false, true, B, 2 * H, H, 1, as_acc(hp, B * H, hbuf), H, W, H, 0, gh, G);
      for_each_row_segment(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        const scalar_t* gib = gi_t + b * G;
        const acc_t* ghb = gh + b * G;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t e = b * H + j;
          acc_t r, z;
          Cell::gates_rz(gib[kGateR * H + j], gib[kGateZ * H + j], ghb[kGateR * H + j],
                         ghb[kGateZ * H + j], r, z);
          r_t[e] = r;
          z_t[e] = z;
          hn_t[e] = r * acc_t(hp[e]);
        }
      });
      gemm<acc_t>(false, true, B, H, H, 1, as_acc(hn_t, B * H, hbuf), H, W + kGateN * H * H,
                  H, 0, gh + kGateN * H, G);
      for_each_row_segment(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        const scalar_t* gib = gi_t + b * G;
        const acc_t* ghb = gh + b * G;
        const bool act = active(b);
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t e = b * H + j;
          acc_t r = r_t[e], z = z_t[e], unused_hn;
          acc_t n = Cell::candidate(gib[kGateN * H + j], ghb[kGateN * H + j], r);
          // A padded step keeps r h in its slot, as the CUDA kernel must (its gradient
          // contributions are zero whatever the slot holds).
          if (!act) Cell::padded(r, z, n, unused_hn);
          h_t[e] = Cell::update(z, n, acc_t(hp[e]));
          r_t[e] = r;
          z_t[e] = z;
          n_t[e] = n;
        }
      });
    }
  }
}

template <typename scalar_t, bool kResetAfter>
void backward_loop(const BackwardLoopArgs& a) {
  using acc_t = acc_of<scalar_t>;
  using Cell = GruCell<acc_t, kResetAfter>;
  const int64_t T = a.output.size(0), B = a.output.size(1), H = a.output.size(2), G = 3 * H;
  const scalar_t* go = a.grad_output.data_ptr<scalar_t>();
  const scalar_t* hx = a.hx.data_ptr<scalar_t>();
  const scalar_t* out = a.output.data_ptr<scalar_t>();
  const scalar_t* ws = a.workspace.data_ptr<scalar_t>();
  scalar_t* dG = a.dG.data_ptr<scalar_t>();
  scalar_t* dGh = a.dGh.data_ptr<scalar_t>();
  const int64_t slot = T * B * H;
  const auto acc_dtype = at::dtype(c10::CppTypeToScalarType<acc_t>::value);
  // dhp [B, H]: dL/dh_prev accumulated for the next step to process; starts as dL/dh_n.
  at::Tensor dhp_buf = a.grad_h_n.to(acc_dtype, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor g_buf = at::empty({kResetAfter ? 0 : B * H}, acc_dtype);
  at::Tensor w_buf = staging<scalar_t>(G * H), d_buf = staging<scalar_t>(B * G);
  acc_t* dhp = dhp_buf.data_ptr<acc_t>();
  acc_t* g = g_buf.data_ptr<acc_t>();
  const acc_t* W = as_acc(a.weight_hh.data_ptr<scalar_t>(), G * H, w_buf.data_ptr<acc_t>());
  acc_t* dbuf = d_buf.data_ptr<acc_t>();

  for (int64_t i = T - 1; i >= 0; --i) {
    const int64_t t = step_at(i, T, a.reverse);
    const scalar_t* hp = i == 0 ? hx : out + step_at(i - 1, T, a.reverse) * B * H;
    const scalar_t* go_t = go + t * B * H;
    const scalar_t* r_t = ws + kSlotR * slot + t * B * H;
    const scalar_t* z_t = ws + kSlotZ * slot + t * B * H;
    const scalar_t* n_t = ws + kSlotN * slot + t * B * H;
    const scalar_t* hn_t = ws + kSlotHn * slot + t * B * H;
    scalar_t* dG_t = dG + t * B * G;
    scalar_t* dGh_t = dGh + t * B * G;

    for_each_row_segment(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
      scalar_t* dGb = dG_t + b * G;
      scalar_t* dGhb = dGh_t + b * G;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t e = b * H + j;
        acc_t dr, dz, dn, dgh_n, dh_prev;
        Cell::backward(acc_t(go_t[e]) + dhp[e], r_t[e], z_t[e], n_t[e], hp[e], hn_t[e], dr,
                       dz, dn, dgh_n, dh_prev);
        dGb[kGateR * H + j] = dr;
        dGb[kGateZ * H + j] = dz;
        dGb[kGateN * H + j] = dn;
        if constexpr (kResetAfter) {
          dGhb[kGateR * H + j] = dr;
          dGhb[kGateZ * H + j] = dz;
          dGhb[kGateN * H + j] = dgh_n;
        }
        dhp[e] = dh_prev;
      }
    });
    if constexpr (kResetAfter) {
      // dhp[B, H] += dGh_t[B, 3H] W_hh[3H, H]
      gemm<acc_t>(false, false, B, H, G, 1, as_acc(dGh_t, B * G, dbuf), G, W, H, 1, dhp, H);
    } else {
      // g[B, H] = dn[B, H] W_hn[H, H]; then dr and g's share of dhp; then the r, z GEMM.
      const acc_t* d = as_acc(dG_t, B * G, dbuf);
      gemm<acc_t>(false, false, B, H, H, 1, d + kGateN * H, G, W + kGateN * H * H, H, 0, g,
                  H);
      for_each_row_segment(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
        scalar_t* dGb = dG_t + b * G;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t e = b * H + j;
          acc_t dr, dh_prev = dhp[e];
          Cell::reset_before_dr(g[e], r_t[e], hp[e], dr, dh_prev);
          dGb[kGateR * H + j] = dr;
          dhp[e] = dh_prev;
        }
      });
      gemm<acc_t>(false, false, B, H, 2 * H, 1, as_acc(dG_t, B * G, dbuf), G, W, H, 1, dhp,
                  H);
    }
  }
  a.grad_hx.copy_(dhp_buf.view({B, H}));
}

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
                          reset_after, reverse, &forward_loop_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                 const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
                 const at::Tensor& weight_hh, const at::Tensor& output,
                 const at::Tensor& workspace, bool has_bias, bool reset_after, bool reverse,
                 std::array<bool, 6> output_mask) {
  return gru_backward_impl(grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output,
                           workspace, has_bias, reset_after, reverse, output_mask,
                           &backward_loop_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(gru_fused, CPU, m) {
  m.impl("gru_forward", &gru_forward_cpu);
  m.impl("gru_backward", &gru_backward_cpu);
}

}  // namespace gru_fused
