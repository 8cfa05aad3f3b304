// The device-independent part of the fused GRU: argument checks, the big GEMMs before
// and after the step loop, and the interface each backend's step loop implements.
//
// One layer, one direction. Shapes: T steps, B batch, I input features, H hidden units.
//
// Forward:
//   gi = x W_ih^T + folded biases                        one GEMM, [T, B, 3H]
//   for each step (backend): gh = h W_hh^T, gate math -> h_t, saved activations
// Backward:
//   for each step in reverse (backend): gate gradients, dh_{t-1} = dh z + dgh W_hh
//   dx = dG W_ih, dW_ih = dG^T x, dW_hh = dGh^T [h_prev or r h], biases = sums
//                                                         big GEMMs after the loop
// A backend may take the steps in chunks (BackendExtras): then each chunk of steps has
// its GEMMs before (forward) or after (backward) its part of the loop.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

// The Tensor class and its methods only: each source includes the per-operator headers
// (<ATen/ops/empty.h>, ...) of the functions it calls (see gru_driver.cpp).
#include <ATen/core/Tensor.h>

namespace gru_fused {

// What a backend's forward step loop reads and writes. All tensors are contiguous and
// on one device with one dtype, except lengths (int64, on that device too).
struct ForwardLoopArgs {
  at::Tensor gi;         // [T, B, 3H] in:  x W_ih^T + b_ih (+ b_hr, b_hz; + b_hn if !reset_after)
                         //   or, with gi_rows, the [I, 3H] table of those rows for one-hot x
  at::Tensor gi_rows;    // [T, B] int64 in: step t's row b of gi is gi[gi_rows[t, b]]; else
                         //   undefined (only backends offering OneHotOps are given one)
  at::Tensor hx;         // [B, H]     in:  initial state
  at::Tensor weight_hh;  // [3H, H]    in
  at::Tensor b_hn;       // [H]        in:  added inside r * (...) when reset_after; else undefined
  at::Tensor lengths;    // [B] int64  in:  on the loops' device (BackendExtras::
                         //   lengths_to_device); undefined when no sequence is padded
  at::Tensor output;     // [T, B, H]  out: h_t for every step (the carried state when padded)
  at::Tensor workspace;  // [4, T, B, H] out: r, z, n and kSlotHn (see gru_math.h); or
                         // [4, 1, B, H] for gru_inference, every step reusing the one slot
                         // set (the CPU and the CUDA loops are both called so)
  bool reset_after;
  bool reverse;
  // Chunks (BackendExtras::step_chunks): this call runs loop iterations [iter_begin,
  // iter_end), and gi holds only the steps they process, the first being step0. Other
  // backends are called once with all T steps.
  int64_t iter_begin = 0, iter_end = 0, step0 = 0;
};

// What a backend's backward step loop reads and writes.
struct BackwardLoopArgs {
  at::Tensor grad_output;  // [T, B, H]    in
  at::Tensor grad_h_n;     // [B, H]       in
  at::Tensor hx;           // [B, H]       in
  at::Tensor weight_hh;    // [3H, H]      in
  at::Tensor output;       // [T, B, H]    in:  from the forward
  at::Tensor workspace;    // [4, T, B, H] in:  from the forward
  at::Tensor dG;           // [T, B, 3H]   out: dL/dgi, gates (r, z, n)
  at::Tensor dGh;          // [T, B, 3H]   out: dL/dgh; the same tensor as dG when
                           //                   !reset_after. Its r, z columns would repeat
                           //                   dG's, so the driver reads only its n column;
                           //                   [T, B, H], that column alone, for a backend
                           //                   that asks (BackendExtras::dgh_candidate_only)
  at::Tensor grad_hx;      // [B, H]       out
  bool reset_after;
  bool reverse;
  // Chunks (BackendExtras::step_chunks): this call runs iterations [iter_begin, iter_end),
  // from the last down; dG and dGh hold only the steps they process, the first being
  // step0; dh [B, H] (the accumulate type: float for half and bfloat16) carries dL/dh
  // from call to call: the first call (iter_end = T) starts it from grad_h_n, the last
  // (iter_begin = 0) writes grad_hx from it. Other backends are called once.
  int64_t iter_begin = 0, iter_end = 0, step0 = 0;
  at::Tensor dh;
};

using ForwardLoop = void (*)(const ForwardLoopArgs&);
using BackwardLoop = void (*)(const BackwardLoopArgs&);

// A backend's shortcuts for one-hot input, where every row of input [T, B, I] holds one
// 1 and zeros elsewhere (a character or word model's input): then x W_ih^T is a lookup
// in the table W_ih^T + biases (ForwardLoopArgs::gi_rows, which a backend offering these
// must read) and dG^T x a scatter-add, instead of T*B*3H*I multiply-adds. Telling means
// reading the input on the host, so only the CPU offers these.
struct OneHotOps {
  // The [T * B] int64 column of each row's 1; an undefined tensor if input is not one-hot.
  at::Tensor (*columns)(const at::Tensor& input);
  // dG^T x [3H, I] for one-hot x with those columns; dG2d [rows, 3H], columns [rows].
  at::Tensor (*grad_weight)(const at::Tensor& dG2d, const at::Tensor& columns, int64_t I);
};

// What a backend's loops can do beyond running all steps on full-size buffers (the
// CPU's one_hot, step_chunks and dgh_candidate_only), and how lengths reach a device
// (CUDA's lengths_to_device).
struct BackendExtras {
  const OneHotOps* one_hot = nullptr;
  // Loops take steps in chunks (the *LoopArgs' iter_begin...): gi, dG and dGh then stay
  // within the scratch cache (gru_driver.cpp) however long the sequence.
  bool step_chunks = false;
  // The backward loop writes only dGh's n column, into a [T, B, H] dGh.
  bool dgh_candidate_only = false;
  // lengths [B] (int64, contiguous, on the CPU, values checked) copied to `device`, the
  // input's, for work the driver then launches on that device's current stream; the
  // result is only read. Unset, the loops read the CPU tensor itself: a backend on
  // another device must set it. Called only when some sequence is padded.
  at::Tensor (*lengths_to_device)(const at::Tensor& lengths, c10::Device device) = nullptr;
};

// The op implementations, parametrised by the backend's step loops. keep_workspace =
// false (gru_inference) saves nothing for a backward: the returned workspace is the
// [4, 1, B, H] scratch of the last step.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_impl(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reset_after, bool reverse, ForwardLoop loop, const BackendExtras& extras = {},
    bool keep_workspace = true);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_impl(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                  const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
                  const at::Tensor& weight_hh, const at::Tensor& output,
                  const at::Tensor& workspace, const std::optional<at::Tensor>& lengths,
                  bool has_bias, bool reset_after, bool reverse,
                  std::array<bool, 6> output_mask, BackwardLoop loop,
                  const BackendExtras& extras = {});

// The CPU memory the ops keep between calls (gru_driver.cpp): every thread's scratch
// buffers (at most 4 x 32 MiB per thread that has called an op) and the workspace pool
// (at most 2 freed blocks, each the size of a workspace freed recently). cached_bytes()
// is their total; empty_cache() drops them all and returns the bytes released (a buffer
// still in use by a live tensor is freed when that tensor dies).
int64_t cached_bytes();
int64_t empty_cache();

#ifdef GRU_FUSED_WITH_CUDA
// The CUDA backend's device copies of lengths (cuda/gru_cuda_ops.cpp): at most 64 of
// B int64 each, plus those a CUDA graph captured, which are kept for good. Drops the
// others; CUDA memory, so not counted by cached_bytes().
void empty_cuda_lengths_cache();
#endif

// Index of the step processed at loop iteration i.
inline int64_t step_at(int64_t i, int64_t T, bool reverse) { return reverse ? T - 1 - i : i; }

}  // namespace gru_fused
