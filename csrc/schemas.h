// The op schemas, as strings, so the library (ops.cpp) and the emulation test extension
// (tests/emu/emu_ops.cpp) declare exactly the same signatures.
#pragma once

namespace gru_fused {

// One layer, one direction. Returns (output [T, B, H], h_n [B, H], workspace
// [4, T, B, H]); the workspace holds what gru_backward needs and nothing else.
constexpr const char* kForwardSchema =
    "gru_forward(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, "
    "Tensor? bias_ih, Tensor? bias_hh, Tensor? lengths, bool reset_after, bool reverse) "
    "-> (Tensor, Tensor, Tensor)";

// gru_forward without the workspace, for when no gradient will be taken (inference):
// returns (output [T, B, H], h_n [B, H]). The CPU kernel never writes the [4, T, B, H]
// workspace; elsewhere it is gru_forward with the workspace dropped.
constexpr const char* kInferenceSchema =
    "gru_inference(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, "
    "Tensor? bias_ih, Tensor? bias_hh, Tensor? lengths, bool reset_after, bool reverse) "
    "-> (Tensor, Tensor)";

// Returns (grad_input, grad_hx, grad_weight_ih, grad_weight_hh, grad_bias_ih,
// grad_bias_hh); an entry whose output_mask is false (or a bias grad when has_bias is
// false) is an empty tensor of shape [0] and costs nothing. lengths is the forward's:
// padded positions of input (t >= lengths[b]) take no part, whatever they hold.
constexpr const char* kBackwardSchema =
    "gru_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx, "
    "Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor workspace, Tensor? lengths, "
    "bool has_bias, "
    "bool reset_after, bool reverse, bool[6] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";

}  // namespace gru_fused
