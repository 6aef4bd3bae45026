// Glue between LibTorch tensors and the CPU kernels (kernels/cpu), shared by the grouped experts and the
// fused MoE function: per-expert GEMMs and row-parallel kernel launches. Internal to src/layer.
//
// Legend: N rows grouped by expert (off [E+1]), T tokens, C model width, F expert hidden width,
// weights in nn.Linear's layout [E, O, I].
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels/cpu/gather_rows.h"
#include "kernels/cpu/gelu.h"
#include "kernels/cpu/scatter_add_gated.h"
#include "kernels/cpu/small_mm.h"
#include "kernels/cpu/small_mm_bf16.h"
#include "kernels/cpu/swiglu.h"
#include "moeforge/layer/fused_moe.h"
#include "moeforge/layer/workspace.h"

namespace moeforge::detail {

// Groups of at most this many rows go to the small-GEMM kernel instead of BLAS: at decode sizes a product
// is bound by reading the expert's weights, and BLAS's packing (a copy of the weight per call) and thread
// start-up cost more than the product. Measured with the kernel alone (C = 512, F = 1024, AVX-512,
// 2 threads, weights from DRAM): 1-3 rows stream at 40-48 GB/s and 4-7 at 23-36 (BLAS 8-17), 16 rows
// run at 11-17 GB/s (BLAS 8-14); past that BLAS's packed panels pay off.
constexpr int64_t kSmallGroupRows = 16;

// A scratch buffer: from the layer's workspace when there is one, else fresh.
inline torch::Tensor scratch(Workspace* ws, const std::string& key, at::IntArrayRef shape,
                             const torch::TensorOptions& opt) {
  return ws ? ws->get(key, shape, opt) : torch::empty(shape, opt);
}

template <typename T>
T* data(const torch::Tensor& t) {
  return t.data_ptr<T>();
}

// Output columns per small-GEMM task: a block of a weight's rows streamed by one thread.
constexpr int64_t kSmallTaskCols = 64;

// task(t) for every t < n_task, in one parallel region, handed out one at a time from a shared counter:
// the thread that wakes first starts at once and the one that wakes 10-50 us later (the passive OpenMP
// pool) takes what is left, where a fixed split would leave the first one idle at the end. Threads only
// when there is enough to stream (`weight_bytes` read by all tasks): waking the pool costs ~10-50 us, more
// than reading a few hundred KiB (one decode expert's weights are 2 MiB per product; from DRAM two threads
// read ~45 GB/s, one ~34).
template <typename Task>
void run_streaming_tasks(int64_t n_task, int64_t weight_bytes, const Task& task) {
  constexpr int64_t kParallelBytes = int64_t{1} << 20;
  const int64_t parts = weight_bytes >= kParallelBytes ? std::max(at::get_num_threads(), 1) : 1;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, parts, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n_task; t = next.fetch_add(1)) task(t);
  });
}

// out [n, O] float32 = in [n, I] @ w [O, I]^T (both contiguous) in small-GEMM tasks of kSmallTaskCols
// outputs: the products of a few rows at decode (attention projections, the output head), where BLAS packs
// the whole weight for one row (OpenBLAS's sgemm copies it before multiplying: twice the memory traffic of
// the product). float32 in small_mm_nt; bf16 in and w (bf16-stored weights, docs/performance.md "bf16
// inference") in small_mm_nt_bf16. out's rows are ld apart.
template <typename T>
void small_linear(float* out, int64_t ld, const T* in, const T* w, int64_t n, int64_t O, int64_t I) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>, "float32 or bf16 operands");
  const int64_t n_task = (O + kSmallTaskCols - 1) / kSmallTaskCols;
  run_streaming_tasks(n_task, O * I * int64_t(sizeof(T)), [&](int64_t t) {
    const int64_t o0 = t * kSmallTaskCols, cols = std::min(kSmallTaskCols, O - o0);
    if constexpr (std::is_same_v<T, float>)
      kernels::cpu::small_mm_nt(out + o0, ld, in, w + o0 * I, n, cols, I);
    else
      kernels::cpu::small_mm_nt_bf16(out + o0, ld, reinterpret_cast<const uint16_t*>(in),
                                     reinterpret_cast<const uint16_t*>(w + o0 * I), n, cols, I);
  });
}

// One product of grouped_mm_nt: out [N, O] from weights w [E, O, I].
struct NtProduct {
  torch::Tensor* out;
  const torch::Tensor* w;
};

// out[rows of e] = in[rows of e] @ w[e]^T for every expert and every product (products share the input
// rows: the gate and up projections go in one call); w [E, O, I], in [N, I], out [N, O].
// Large groups go to BLAS one expert at a time (BLAS threads them itself). Small groups run as small_mm_nt
// tasks over (product, expert, block of 64 outputs) (run_streaming_tasks; skewed decode also puts 1 row on
// some experts and 10+ on others).
template <typename T>
void grouped_mm_nt(const torch::Tensor& in, const std::vector<int64_t>& off,
                   std::initializer_list<NtProduct> products) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1, I = in.size(1);
  std::vector<int64_t> small;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    if (n <= kSmallGroupRows) {
      small.push_back(e);
      continue;
    }
    for (const auto& p : products) {
      auto o = p.out->narrow(0, off[e], n);
      at::mm_out(o, in.narrow(0, off[e], n), (*p.w)[e].t());
    }
  }
  if (small.empty()) return;
  struct Task {
    T* out;
    const T* w;
    int64_t e, ld, cols;
  };
  std::vector<Task> tasks;
  int64_t weight_bytes = 0;
  for (const auto& p : products) {
    const int64_t O = p.w->size(1);
    for (int64_t e : small)
      for (int64_t o0 = 0; o0 < O; o0 += kSmallTaskCols) {
        const int64_t cols = std::min(kSmallTaskCols, O - o0);
        tasks.push_back({data<T>(*p.out) + off[e] * O + o0, data<T>(*p.w) + (e * O + o0) * I, e, O, cols});
        weight_bytes += cols * I * static_cast<int64_t>(sizeof(T));
      }
  }
  const T* pi = data<T>(in);
  run_streaming_tasks(static_cast<int64_t>(tasks.size()), weight_bytes, [&](int64_t t) {
    const Task& k = tasks[static_cast<size_t>(t)];
    kernels::cpu::small_mm_nt(k.out, k.ld, pi + off[k.e] * I, k.w, off[k.e + 1] - off[k.e], k.cols, I);
  });
}

template <typename T>
void grouped_mm_nt(torch::Tensor& out, const torch::Tensor& in, const torch::Tensor& w,
                   const std::vector<int64_t>& off) {
  grouped_mm_nt<T>(in, off, {NtProduct{&out, &w}});
}

// out[rows of e] (+)= in[rows of e] @ w[e]; w [E, I, O], in [N, I], out [N, O] (backward products).
inline void grouped_mm_nn(torch::Tensor& out, const torch::Tensor& in, const torch::Tensor& w,
                          const std::vector<int64_t>& off, bool accumulate) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    auto o = out.narrow(0, off[e], n);
    if (accumulate)
      o.addmm_(in.narrow(0, off[e], n), w[e]);
    else
      at::mm_out(o, in.narrow(0, off[e], n), w[e]);
  }
}

// The parameter gradient that a weight gradient may be added into directly, or an undefined tensor.
// Megatron's gradient-accumulation fusion: when `w` is a leaf whose .grad already exists (the trainer
// zeroes gradients in place, and gradient accumulation keeps them), the weight-gradient GEMMs add into
// .grad themselves (beta = 1) and backward returns no gradient for `w`. That saves a fresh [E, O, I]
// buffer per weight and step (at the top-2 shape 32 MiB each: ~8,000 first-touch page faults) and the
// separate read-add-write pass of autograd's AccumulateGrad. Not taken when autograd must see the
// gradient: a backward restricted to some inputs or torch::autograd::grad (the engine then runs only
// some AccumulateGrad nodes or captures gradients instead), hooks on `w`, a double-backward graph (grad
// mode on), or a .grad of another layout.
inline torch::Tensor fusable_grad(const torch::Tensor& w) {
  if (!w.defined() || !w.is_leaf() || !w.requires_grad() || at::GradMode::is_enabled()) return {};
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  if (exec_info != nullptr && !exec_info->empty()) return {};
  if (!torch::autograd::impl::hooks(w).empty()) return {};
  const auto& g = w.grad();
  if (!g.defined() || g.requires_grad() || !g.is_contiguous() || g.sizes() != w.sizes() ||
      g.scalar_type() != w.scalar_type() || g.device() != w.device() || g.is_sparse())
    return {};
  return g;
}

// dw[e] = d[rows of e]^T @ in[rows of e] for every expert: [E, O, I] like w, zero for experts without
// rows. Returns dw, or an undefined tensor when dw was added into w's existing .grad (fusable_grad).
void note_fused_grad_accumulation();  // counts for fused_grad_accumulations() (fused_moe.h)

inline torch::Tensor grouped_weight_grad(const torch::Tensor& d, const torch::Tensor& in,
                                         const std::vector<int64_t>& off, const torch::Tensor& w) {
  auto acc = fusable_grad(w);
  auto dw = acc.defined() ? acc : torch::empty_like(w, at::MemoryFormat::Contiguous);
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    auto o = dw[e];
    if (n == 0) {
      if (!acc.defined()) o.zero_();
    } else if (acc.defined()) {
      o.addmm_(d.narrow(0, off[e], n).t(), in.narrow(0, off[e], n));
    } else {
      at::mm_out(o, d.narrow(0, off[e], n).t(), in.narrow(0, off[e], n));
    }
  }
  if (!acc.defined()) return dw;
  note_fused_grad_accumulation();
  return {};
}

// Adds the health of output rows y [n, C] (rows of experts by `off`, relative to y's first row) to
// sum_sq [E] (sum over rows of the row's mean square) and bad [E] (rows with a NaN or Inf), float64/int64.
template <typename T>
void accumulate_expert_health(const torch::Tensor& y, const std::vector<int64_t>& off, double* sum_sq,
                              int64_t* bad) {
  const int64_t C = y.size(1), E = static_cast<int64_t>(off.size()) - 1;
  const T* py = data<T>(y);
  at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e)
      for (int64_t r = off[e]; r < off[e + 1]; ++r) {
        double sq = 0;
        bool finite = true;
        for (int64_t c = 0; c < C; ++c) {
          const double v = static_cast<double>(py[r * C + c]);
          finite = finite && std::isfinite(v);
          sq += v * v;
        }
        sum_sq[e] += sq / static_cast<double>(C);
        bad[e] += finite ? 0 : 1;
      }
  });
}

// Running sums behind ExpertHealth (fused_moe.h), over output rows grouped by expert (offsets `off`):
// fed chunk by chunk by the fused function, or at once by MoELayer for the unfused paths.
struct HealthSums {
  std::vector<double> sum_sq;
  std::vector<int64_t> rows, bad;
  explicit HealthSums(const std::vector<int64_t>& off)
      : sum_sq(off.size() - 1, 0.0), rows(off.size() - 1, 0), bad(off.size() - 1, 0) {
    for (size_t e = 0; e + 1 < off.size(); ++e) rows[e] = off[e + 1] - off[e];
  }
  template <typename T>
  void add(const torch::Tensor& y_rows, const std::vector<int64_t>& off) {
    accumulate_expert_health<T>(y_rows, off, sum_sq.data(), bad.data());
  }
  ExpertHealth result() const {
    const int64_t E = static_cast<int64_t>(rows.size());
    ExpertHealth h{torch::zeros({E}, torch::kDouble), torch::zeros({E}, torch::kLong)};
    for (int64_t e = 0; e < E; ++e) {
      if (rows[e] > 0) h.out_rms[e] = std::sqrt(sum_sq[e] / static_cast<double>(rows[e]));
      h.nonfinite[e] = bad[e];
    }
    return h;
  }
};

// Row-parallel launches of the kernels. Grains keep a task at a few hundred KiB of traffic.
template <typename T>
void gather_rows(torch::Tensor& out, const torch::Tensor& in, const torch::Tensor& index) {
  const int64_t N = out.size(0), C = out.size(1);
  T* po = data<T>(out);
  const T* pi = data<T>(in);
  const int64_t* px = index.data_ptr<int64_t>();
  at::parallel_for(0, N, 64, [&](int64_t r0, int64_t r1) {
    kernels::cpu::gather_rows(po + r0 * C, pi, px + r0, r1 - r0, C);
  });
}

// out [T, C] += gate * in [N, C] at rows index; gate undefined = 1. Threads split the columns (no races).
template <typename T>
void scatter_add_gated(torch::Tensor& out, const torch::Tensor& in, const torch::Tensor& index,
                       const torch::Tensor& gate) {
  const int64_t N = in.size(0), C = in.size(1);
  T* po = data<T>(out);
  const T* pi = data<T>(in);
  const T* pg = gate.defined() ? data<T>(gate) : nullptr;
  const int64_t* px = index.data_ptr<int64_t>();
  // Column blocks of at least 64 and of at least ~32K elements in all: at decode sizes (a few rows) waking
  // the other threads costs more than the whole scatter.
  const int64_t grain = std::max<int64_t>(64, (int64_t{1} << 15) / std::max<int64_t>(N, 1));
  at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
    kernels::cpu::scatter_add_gated(po, pi, px, pg, N, C, c0, c1);
  });
}

template <typename T>
void swiglu_forward(torch::Tensor& h, const torch::Tensor& a, const torch::Tensor& b,
                    const torch::Tensor& gate) {
  const int64_t N = a.size(0), F = a.size(1);
  T* ph = data<T>(h);
  const T* pa = data<T>(a);
  const T* pb = data<T>(b);
  const T* pg = gate.defined() ? data<T>(gate) : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    kernels::cpu::swiglu_forward(ph + r0 * F, pa + r0 * F, pb + r0 * F, pg ? pg + r0 : nullptr, r1 - r0, F);
  });
}

// da may be dh; d_gate undefined when there is no gate.
template <typename T>
void swiglu_backward(torch::Tensor& da, torch::Tensor& db, torch::Tensor& d_gate, const torch::Tensor& dh,
                     const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& gate) {
  const int64_t N = a.size(0), F = a.size(1);
  T* pda = data<T>(da);
  T* pdb = data<T>(db);
  T* pdg = d_gate.defined() ? data<T>(d_gate) : nullptr;
  const T* pdh = data<T>(dh);
  const T* pa = data<T>(a);
  const T* pb = data<T>(b);
  const T* pg = gate.defined() ? data<T>(gate) : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    const int64_t o = r0 * F;
    kernels::cpu::swiglu_backward(pda + o, pdb + o, pdg ? pdg + r0 : nullptr, pdh + o, pa + o, pb + o,
                                  pg ? pg + r0 : nullptr, r1 - r0, F);
  });
}

template <typename T>
void gelu_forward(torch::Tensor& h, const torch::Tensor& a, const torch::Tensor& gate) {
  const int64_t N = a.size(0), F = a.size(1);
  T* ph = data<T>(h);
  const T* pa = data<T>(a);
  const T* pg = gate.defined() ? data<T>(gate) : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    kernels::cpu::gelu_forward(ph + r0 * F, pa + r0 * F, pg ? pg + r0 : nullptr, r1 - r0, F);
  });
}

// da may be dh; d_gate undefined when there is no gate.
template <typename T>
void gelu_backward(torch::Tensor& da, torch::Tensor& d_gate, const torch::Tensor& dh, const torch::Tensor& a,
                   const torch::Tensor& gate) {
  const int64_t N = a.size(0), F = a.size(1);
  T* pda = data<T>(da);
  T* pdg = d_gate.defined() ? data<T>(d_gate) : nullptr;
  const T* pdh = data<T>(dh);
  const T* pa = data<T>(a);
  const T* pg = gate.defined() ? data<T>(gate) : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    const int64_t o = r0 * F;
    kernels::cpu::gelu_backward(pda + o, pdg ? pdg + r0 : nullptr, pdh + o, pa + o, pg ? pg + r0 : nullptr,
                                r1 - r0, F);
  });
}

// --- bf16 products (train.precision = "bf16"; docs/performance.md, "bf16 training") ---
// The operands are bf16 copies, the products run in LibTorch's bf16 matrix product (oneDNN on CPUs with
// AVX512-BF16 or AMX: bf16 multiplies, float32 accumulation, the result rounded to bf16) into a bf16
// buffer, which is then widened into the float32 output (copied, or added). Everything between the
// products stays float32.
//
// The bf16 operands are laid out padded: expert e's rows start at poff[e] and take n_e rounded up to
// kBf16RowAlign rows, the pad rows zero. oneDNN compiles a kernel for every product shape it meets and
// keeps a bounded cache of them; with each expert's exact row count, which changes every step, it meets
// new shapes all the time and runs at half its rate (measured with [256 +- 60, 512] x [512, 688]: 206-274
// GFLOP/s with varying rows, 398 with rows rounded to 64). Zero pad rows add nothing to the weight
// gradients' sums, and the pad rows of a product's output are never read.
constexpr int64_t kBf16RowAlign = 32;

// Offsets of the padded layout: poff[e + 1] - poff[e] = n_e rounded up to kBf16RowAlign.
inline std::vector<int64_t> padded_offsets(const std::vector<int64_t>& off) {
  std::vector<int64_t> poff(off.size(), 0);
  for (size_t e = 0; e + 1 < off.size(); ++e)
    poff[e + 1] = poff[e] + (off[e + 1] - off[e] + kBf16RowAlign - 1) / kBf16RowAlign * kBf16RowAlign;
  return poff;
}

// A bf16 copy of t [N, D] (rows grouped by off) in the padded layout [poff.back(), D], in the workspace slot
// `key`.
inline torch::Tensor to_bf16_padded(Workspace* ws, const std::string& key, const torch::Tensor& t,
                                    const std::vector<int64_t>& off, const std::vector<int64_t>& poff) {
  auto out = scratch(ws, key, {poff.back(), t.size(1)}, t.options().dtype(torch::kBFloat16));
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    const int64_t n = off[e + 1] - off[e], np = poff[e + 1] - poff[e];
    if (n > 0) out.narrow(0, poff[e], n).copy_(t.narrow(0, off[e], n));
    if (np > n) out.narrow(0, poff[e] + n, np - n).zero_();
  }
  return out;
}

// out[rows of e] (+)= in[padded rows of e] @ w[e]^T (transpose_w) or @ w[e]; in and w bf16 (in padded),
// out float32 [N, O]; tmp a bf16 [poff.back(), O] buffer. With `small_groups` (bf16-stored weights at
// inference, docs/performance.md "bf16 inference"; forward products only: transpose_w, no accumulate),
// groups of at most kSmallGroupRows rows go to small_mm_nt_bf16 instead, unpadded, in float32 (LibTorch's
// bf16 product of a few rows is slower than reading the weight); training keeps oneDNN's products.
inline void grouped_mm_bf16(torch::Tensor& out, const torch::Tensor& in, const torch::Tensor& w,
                            const std::vector<int64_t>& off, const std::vector<int64_t>& poff,
                            bool transpose_w, bool accumulate, torch::Tensor& tmp,
                            bool small_groups = false) {
  const int64_t E = static_cast<int64_t>(off.size()) - 1, O = w.size(1), I = w.size(2);
  TORCH_CHECK(!small_groups || (transpose_w && !accumulate),
              "grouped_mm_bf16: small groups are forward only");
  std::vector<int64_t> small;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e], np = poff[e + 1] - poff[e];
    if (n == 0) continue;
    if (small_groups && n <= kSmallGroupRows) {
      small.push_back(e);
      continue;
    }
    auto o = tmp.narrow(0, poff[e], np);
    at::mm_out(o, in.narrow(0, poff[e], np), transpose_w ? w[e].t() : w[e]);
    auto dst = out.narrow(0, off[e], n);
    const auto src = tmp.narrow(0, poff[e], n);
    if (accumulate)
      dst.add_(src);
    else
      dst.copy_(src);
  }
  if (small.empty()) return;
  const int64_t blocks = (O + kSmallTaskCols - 1) / kSmallTaskCols;
  const auto* pi = reinterpret_cast<const uint16_t*>(in.data_ptr<at::BFloat16>());
  const auto* pw = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* po = out.data_ptr<float>();
  const auto n_task = static_cast<int64_t>(small.size()) * blocks;
  run_streaming_tasks(n_task, static_cast<int64_t>(small.size()) * O * I * 2, [&](int64_t t) {
    const int64_t e = small[static_cast<size_t>(t / blocks)], o0 = (t % blocks) * kSmallTaskCols;
    kernels::cpu::small_mm_nt_bf16(po + off[e] * O + o0, O, pi + poff[e] * I, pw + (e * O + o0) * I,
                                   off[e + 1] - off[e], std::min(kSmallTaskCols, O - o0), I);
  });
}

// grouped_weight_grad with bf16 operands d [Np, O] and in [Np, I] in the padded layout: each expert's
// product in a bf16 [O, I] buffer, widened into dw (float32, or added into w's existing .grad as
// fusable_grad allows).
inline torch::Tensor grouped_weight_grad_bf16(const torch::Tensor& d, const torch::Tensor& in,
                                              const std::vector<int64_t>& poff, const torch::Tensor& w) {
  auto acc = fusable_grad(w);
  auto dw = acc.defined() ? acc : torch::empty_like(w, at::MemoryFormat::Contiguous);
  auto tmp = torch::empty({w.size(1), w.size(2)}, d.options());
  const int64_t E = static_cast<int64_t>(poff.size()) - 1;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t np = poff[e + 1] - poff[e];
    auto o = dw[e];
    if (np == 0) {
      if (!acc.defined()) o.zero_();
      continue;
    }
    at::mm_out(tmp, d.narrow(0, poff[e], np).t(), in.narrow(0, poff[e], np));
    if (acc.defined())
      o.add_(tmp);
    else
      o.copy_(tmp);
  }
  if (!acc.defined()) return dw;
  note_fused_grad_accumulation();
  return {};
}

}  // namespace moeforge::detail
