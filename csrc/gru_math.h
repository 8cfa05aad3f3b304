// The GRU gate math: the one place where the formulas live.
//
// Every backend (the CPU step loop, the CUDA kernels, the emulated CUDA kernels in the
// tests) calls these functions per element, so the two formulas and their derivatives
// are written exactly once. The value type V is float or double; a policy M supplies
// sigmoid and tanh: Math<V> (libm, CUDA's intrinsics) everywhere but the CPU's float
// loops, which use FastMathF so that the compiler can vectorize them.
//
// Formulas (per batch row b and hidden unit j; gi = W_i* x + b_i*, gh = W_h* h + b_h*):
//   r  = sigmoid(gi_r + gh_r)
//   z  = sigmoid(gi_z + gh_z)
//   n  = tanh(gi_n + r * gh_n)          reset_after (nn.GRU, cuDNN), gh_n = W_hn h + b_hn
//   n  = tanh(gi_n + gh_n)              reset_before (d2l, Cho et al.), gh_n = W_hn (r h) + b_hn
//   h' = n + z * (h - n)                (= (1 - z) n + z h)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GRU_HD __host__ __device__ __forceinline__
#else
#define GRU_HD inline
#endif

namespace gru_fused {

// Gate order inside every [.., 3H] buffer, as in nn.GRU's weights: reset, update, new.
enum Gate : int { kGateR = 0, kGateZ = 1, kGateN = 2, kNumGates = 3 };

// Slots of the workspace [4, T, B, H] saved by the forward for the backward.
// kSlotHn holds W_hn h + b_hn when reset_after (dr needs it) and r * h otherwise
// (dW_hn needs it); either way the forward has it in hand and backward would
// otherwise have to recompute a GEMM.
enum Slot : int { kSlotR = 0, kSlotZ = 1, kSlotN = 2, kSlotHn = 3, kNumSlots = 4 };

// sigmoid / tanh per value type. Scalar overloads are explicit for float and double:
// a generic exp() in a template instantiated for both would silently compute float64
// gradients in float32 on some toolchains.
template <typename V>
struct Math;

template <>
struct Math<float> {
  GRU_HD static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
  GRU_HD static float tanh(float x) { return tanhf(x); }
};

template <>
struct Math<double> {
  GRU_HD static double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }
  GRU_HD static double tanh(double x) { return ::tanh(x); }
};

#if !defined(__CUDACC__)
// float sigmoid / tanh for the CPU step loops, written branch-free (selects, no calls)
// so that the compiler vectorizes a loop over them: libm's expf and tanhf are opaque
// calls that keep a loop scalar. Accuracy, measured against double on [-100, 100]: exp
// (Cephes expf's polynomial) and tanh within 1 ulp, sigmoid within 2 ulp (libm's tanhf:
// 2). NaN in gives NaN out: every clamp is a comparison, false for NaN. Plain adds,
// multiplies and divides only, so vector lanes and scalar remainders compute the same
// bits (setup.py builds with -ffp-contract=off: no fused multiply-adds).
struct FastMathF {
  static inline float exp(float x) {
    constexpr float kLog2e = 1.44269504088896341f;
    constexpr float kLn2Hi = 0.693359375f;  // few mantissa bits: k * kLn2Hi is exact
    constexpr float kLn2Lo = -2.12194440e-4f;
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float in = x;
    // e^x over/underflows outside about [-87.3, 88.7]; clamp so 2^k stays a normal float.
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    // x = k ln2 + f, |f| <= ln2 / 2; k comes out of the rounded float's mantissa bits
    // (no float-to-int conversion, which is undefined for NaN).
    const float shifted = x * kLog2e + kRound;
    const float kf = shifted - kRound;
    const int32_t k = __builtin_bit_cast(int32_t, shifted) - __builtin_bit_cast(int32_t, kRound);
    const float f = (x - kf * kLn2Hi) - kf * kLn2Lo;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * (f * f) + f + 1.0f;
    const float two_k = __builtin_bit_cast(float, (static_cast<uint32_t>(k) + 127u) << 23);
    // From ln(FLT_MAX) up, e^x overflows to +inf, as libm's expf does: so sigmoid(-inf)
    // is exactly 0 (not 6e-39) and its derivative r (1 - r) exactly 0, as in PyTorch, and
    // a gradient meeting an infinite input is NaN where nn.GRU's is.
    return in >= 88.72283935546875f ? __builtin_inff() : p * two_k;
  }
  static inline float sigmoid(float x) { return 1.0f / (1.0f + exp(-x)); }
  static inline float tanh(float x) {
    const float ax = __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, x) & 0x7fffffffu);
    // |x| < 0.625: Cephes tanhf's odd polynomial; 1 - 2 / (e^2|x| + 1) would cancel.
    const float z = ax * ax;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    const float small = p * z * ax + ax;
    const float large = 1.0f - 2.0f / (exp(2.0f * ax) + 1.0f);
    const float t = ax < 0.625f ? small : large;  // NaN takes `large`, which is NaN
    // tanh is odd: give t the sign bit of x (so tanh(-0) = -0).
    const uint32_t sign = __builtin_bit_cast(uint32_t, x) & 0x80000000u;
    return __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, t) | sign);
  }
};
#endif

// Forward and backward of one GRU cell element. kResetAfter selects the formula; the
// two differ only in candidate() and in where dr comes from in the backward. M supplies
// sigmoid and tanh: Math<V> everywhere, FastMathF in the CPU's float loops.
template <typename V, bool kResetAfter, typename M = Math<V>>
struct GruCell {
  // r and z from their pre-activations (the biases are already in gi or gh).
  GRU_HD static void gates_rz(V gi_r, V gi_z, V gh_r, V gh_z, V& r, V& z) {
    r = M::sigmoid(gi_r + gh_r);
    z = M::sigmoid(gi_z + gh_z);
  }

  // The candidate state. gh_n is W_hn h + b_hn (reset_after) or W_hn (r h) + b_hn.
  GRU_HD static V candidate(V gi_n, V gh_n, V r) {
    if constexpr (kResetAfter) {
      return M::tanh(gi_n + r * gh_n);
    } else {
      return M::tanh(gi_n + gh_n);
    }
  }

  GRU_HD static V update(V z, V n, V h_prev) { return n + z * (h_prev - n); }

  // Backward of one element given dh = dL/dh' and the saved r, z, n, h_prev, and
  // saved_hn (slot kSlotHn). Produces the gradients of the pre-activations:
  //   dr, dz, dn  w.r.t. gi_r, gi_z, gi_n (equal to those w.r.t. gh_r, gh_z),
  //   dgh_n       w.r.t. gh_n,
  //   dh_prev     the direct share of dL/dh (through z); the recurrent GEMM adds the rest.
  // reset_before: dr needs g = dn W_hn, a GEMM over all units, so dr is left at zero
  // here and completed by reset_before_dr() once g is known.
  GRU_HD static void backward(V dh, V r, V z, V n, V h_prev, V saved_hn, V& dr, V& dz,
                              V& dn, V& dgh_n, V& dh_prev) {
    const V one(1);
    dz = dh * (h_prev - n) * z * (one - z);
    dn = dh * (one - z) * (one - n * n);
    dh_prev = dh * z;
    if constexpr (kResetAfter) {
      dgh_n = dn * r;
      dr = dn * saved_hn * r * (one - r);
    } else {
      dgh_n = dn;
      dr = V(0);
    }
  }

  // reset_before only: with g = dL/d(r h) = dn W_hn, the reset gate's gradient and its
  // share of dL/dh_prev.
  GRU_HD static void reset_before_dr(V g, V r, V h_prev, V& dr, V& dh_prev) {
    const V one(1);
    dr = g * h_prev * r * (one - r);
    dh_prev = dh_prev + g * r;
  }

  // A padded step (t >= lengths[b]) carries the state unchanged. Saving r = 0, z = 1,
  // n = 0 makes update() return h_prev exactly and backward() pass dh straight through
  // with zero gate gradients, so the backward needs no notion of lengths.
  GRU_HD static void padded(V& r, V& z, V& n, V& saved_hn) {
    r = V(0);
    z = V(1);
    n = V(0);
    saved_hn = V(0);
  }
};

}  // namespace gru_fused
