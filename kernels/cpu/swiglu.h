// The SwiGLU activation of the experts, fused into one pass, with the combine gate folded in.
// Legend: n rows, width = F (expert hidden width); a = x W_gate^T, b = x W_up^T, both [n, F].
#pragma once

#include <cstdint>

namespace moeforge::kernels::cpu {

// h[r, :] = gate[r] * silu(a[r, :]) * b[r, :]; gate == nullptr means 1. h [n, F].
void swiglu_forward(float* h, const float* a, const float* b, const float* gate, int64_t n, int64_t width);
void swiglu_forward(double* h, const double* a, const double* b, const double* gate, int64_t n,
                    int64_t width);

// Backward of y = gate * (silu(a) * b) W_down^T given dh = dy W_down (not yet scaled by the gate), [n, F]:
//   d_gate[r] = <dh[r, :], silu(a[r, :]) * b[r, :]>   (skipped when d_gate == nullptr)
//   db = gate * dh * silu(a),  da = gate * dh * b * silu'(a),  silu'(a) = s (1 + a (1 - s)), s = sigmoid(a).
// da may alias dh (each element is read before it is written); gate == nullptr means 1.
void swiglu_backward(float* da, float* db, float* d_gate, const float* dh, const float* a, const float* b,
                     const float* gate, int64_t n, int64_t width);
void swiglu_backward(double* da, double* db, double* d_gate, const double* dh, const double* a,
                     const double* b, const double* gate, int64_t n, int64_t width);

}  // namespace moeforge::kernels::cpu
