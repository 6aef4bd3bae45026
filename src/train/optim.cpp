#include "moeforge/train/optim.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/adamw.h"
#include "moeforge/train/adamw_update.h"
#include "moeforge/util/error.h"

namespace moeforge {

AdamW::AdamW(std::vector<std::pair<std::string, torch::Tensor>> params, const TrainConfig& cfg)
    : params_(std::move(params)), cfg_(cfg) {
  for (auto& p : params_) {
    m_.push_back(torch::zeros_like(p.second));
    v_.push_back(torch::zeros_like(p.second));
  }
}

void adamw_update(torch::Tensor& p, torch::Tensor& m, torch::Tensor& v, const AdamWScalars& s, bool fused) {
  const auto& g = p.grad();
  if (!g.defined()) return;
  const bool decay = p.dim() >= 2 && s.weight_decay > 0;  // nanoGPT's rule: norms and vectors not shrunk
  fused = fused && p.device().is_cpu() && p.scalar_type() == torch::kFloat &&
          g.scalar_type() == torch::kFloat && p.is_contiguous() && g.is_contiguous() && m.is_contiguous() &&
          v.is_contiguous();
  if (fused) {
    float* pp = p.data_ptr<float>();
    const float* pg = g.data_ptr<float>();
    float *pm = m.data_ptr<float>(), *pv = v.data_ptr<float>();
    const float dec = decay ? float(1 - s.lr * s.weight_decay) : 1.0f;
    const float step = float(-s.lr / s.bc1);
    at::parallel_for(0, p.numel(), 1 << 15, [&](int64_t b, int64_t e) {
      kernels::cpu::adamw_update(pp + b, pg + b, pm + b, pv + b, e - b, dec, float(s.beta1),
                                 float(1 - s.beta1), float(s.beta2), float(1 - s.beta2), float(s.bc2),
                                 float(s.eps), step);
    });
    return;
  }
  if (decay) p.mul_(1 - s.lr * s.weight_decay);
  m.mul_(s.beta1).add_(g, 1 - s.beta1);
  v.mul_(s.beta2).addcmul_(g, g, 1 - s.beta2);
  auto denom = (v / s.bc2).sqrt_().add_(s.eps);
  p.addcdiv_(m, denom, -s.lr / s.bc1);
}

void AdamW::step(double lr) {
  torch::NoGradGuard ng;
  ++t_;
  const AdamWScalars s{lr,
                       cfg_.beta1,
                       cfg_.beta2,
                       cfg_.adam_eps,
                       cfg_.weight_decay,
                       1 - std::pow(cfg_.beta1, double(t_)),
                       1 - std::pow(cfg_.beta2, double(t_))};
  for (size_t i = 0; i < params_.size(); ++i)
    adamw_update(params_[i].second, m_[i], v_[i], s, /*fused=*/true);
}

void AdamW::zero_grad() {
  for (auto& p : params_)
    if (p.second.grad().defined()) p.second.mutable_grad().zero_();
}

std::vector<std::pair<std::string, torch::Tensor>> AdamW::state() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out.push_back({"adam.m." + params_[i].first, m_[i]});
    out.push_back({"adam.v." + params_[i].first, v_[i]});
  }
  out.push_back({"adam.t", torch::tensor({t_}, torch::kLong)});
  return out;
}

void AdamW::load_state(const std::vector<std::pair<std::string, torch::Tensor>>& state,
                       const std::string& where) {
  auto find = [&](const std::string& name) -> const torch::Tensor& {
    for (auto& s : state)
      if (s.first == name) return s.second;
    throw FileError(where, "optimizer state has no entry '" + name + "'");
  };
  torch::NoGradGuard ng;
  for (size_t i = 0; i < params_.size(); ++i) {
    for (auto* pair : {&m_[i], &v_[i]}) {
      const std::string name = (pair == &m_[i] ? "adam.m." : "adam.v.") + params_[i].first;
      const auto& t = find(name);
      if (t.sizes() != pair->sizes())
        throw FileError(where, "optimizer state '" + name + "' has shape " + c10::str(t.sizes()) +
                                   ", expected " + c10::str(pair->sizes()));
      pair->copy_(t);
    }
  }
  t_ = find("adam.t").item<int64_t>();
}

double learning_rate(const TrainConfig& cfg, int64_t step) {
  if (cfg.warmup > 0 && step < cfg.warmup) return cfg.lr * double(step + 1) / double(cfg.warmup);
  const double min_lr = cfg.lr * cfg.min_lr_ratio;
  if (cfg.schedule == "constant") return cfg.lr;
  if (cfg.schedule == "wsd") {
    // The decay starts decay_fraction of the steps before the end (never inside the warm-up) and reaches the
    // floor at the last step.
    const int64_t decay = std::max<int64_t>(1, std::llround(cfg.decay_fraction * double(cfg.steps)));
    const int64_t start = std::max(cfg.warmup, cfg.steps - decay);
    if (step < start) return cfg.lr;
    const double progress =
        std::min(1.0, double(step - start + 1) / double(std::max<int64_t>(1, cfg.steps - start)));
    return cfg.lr + (min_lr - cfg.lr) * progress;
  }
  const double span = std::max<int64_t>(1, cfg.steps - cfg.warmup);
  const double progress = std::min(1.0, double(step - cfg.warmup) / span);
  return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + std::cos(M_PI * progress));
}

double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  torch::NoGradGuard ng;
  double sq = 0;
  for (auto& p : params) {
    const auto& g = p.grad();
    if (!g.defined()) continue;
    if (g.device().is_cpu() && g.scalar_type() == torch::kFloat && g.is_contiguous()) {
      // Squares summed in float64 in fixed chunks, the chunks' sums added in order (the same on every run
      // and thread count), without the float64 copy of every gradient a .to(kDouble) would allocate
      // (docs/performance.md, "The optimiser phase").
      constexpr int64_t kChunk = int64_t{1} << 16;
      const float* pg = g.data_ptr<float>();
      const int64_t n = g.numel(), chunks = (n + kChunk - 1) / kChunk;
      std::vector<double> part(static_cast<size_t>(chunks), 0.0);
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c)
          part[static_cast<size_t>(c)] =
              kernels::cpu::sum_of_squares(pg + c * kChunk, std::min(kChunk, n - c * kChunk));
      });
      for (double x : part) sq += x;
    } else {
      sq += g.to(torch::kDouble).pow(2).sum().item<double>();
    }
  }
  const double norm = std::sqrt(sq);
  if (max_norm > 0 && norm > max_norm && std::isfinite(norm)) {
    const double scale = max_norm / (norm + 1e-6);
    for (auto& p : params)
      if (p.grad().defined()) p.mutable_grad().mul_(scale);
  }
  return norm;
}

}  // namespace moeforge
