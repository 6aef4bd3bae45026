// The exact (erf) GELU activation of the experts, one pass, with the combine gate folded in, as
// torch::gelu with approximate = "none".
// Legend: n rows, width = F (expert hidden width); a = x W_up^T, [n, F].
#pragma once

#include <cstdint>

namespace moeforge::kernels::cpu {

// h[r, :] = gate[r] * gelu(a[r, :]), gelu(x) = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2; gate == nullptr
// means 1. h may alias a.
void gelu_forward(float* h, const float* a, const float* gate, int64_t n, int64_t width);
void gelu_forward(double* h, const double* a, const double* gate, int64_t n, int64_t width);

// Backward of y = gate * gelu(a) W_down^T given dh = dy W_down (not yet scaled by the gate), [n, F]:
//   d_gate[r] = <dh[r, :], gelu(a[r, :])>   (skipped when d_gate == nullptr)
//   da = gate * dh * gelu'(a),  gelu'(x) = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
// da may alias dh; gate == nullptr means 1.
void gelu_backward(float* da, float* d_gate, const float* dh, const float* a, const float* gate, int64_t n,
                   int64_t width);
void gelu_backward(double* da, double* d_gate, const double* dh, const double* a, const double* gate,
                   int64_t n, int64_t width);

}  // namespace moeforge::kernels::cpu
