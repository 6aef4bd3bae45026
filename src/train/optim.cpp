#include "moeforge/train/optim.h"

#include <cmath>

#include "moeforge/util/error.h"

namespace moeforge {

AdamW::AdamW(std::vector<std::pair<std::string, torch::Tensor>> params, const TrainConfig& cfg)
    : params_(std::move(params)), cfg_(cfg) {
  for (auto& p : params_) {
    m_.push_back(torch::zeros_like(p.second));
    v_.push_back(torch::zeros_like(p.second));
  }
}

void AdamW::step(double lr) {
  torch::NoGradGuard ng;
  ++t_;
  const double bc1 = 1 - std::pow(cfg_.beta1, double(t_));
  const double bc2 = 1 - std::pow(cfg_.beta2, double(t_));
  for (size_t i = 0; i < params_.size(); ++i) {
    auto& p = params_[i].second;
    const auto& g = p.grad();
    if (!g.defined()) continue;
    // Decoupled decay on matrices only (nanoGPT's rule): norms and vectors are not shrunk.
    if (p.dim() >= 2 && cfg_.weight_decay > 0) p.mul_(1 - lr * cfg_.weight_decay);
    m_[i].mul_(cfg_.beta1).add_(g, 1 - cfg_.beta1);
    v_[i].mul_(cfg_.beta2).addcmul_(g, g, 1 - cfg_.beta2);
    auto denom = (v_[i] / bc2).sqrt_().add_(cfg_.adam_eps);
    p.addcdiv_(m_[i], denom, -lr / bc1);
  }
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
  const double span = std::max<int64_t>(1, cfg.steps - cfg.warmup);
  const double progress = std::min(1.0, double(step - cfg.warmup) / span);
  const double min_lr = cfg.lr * cfg.min_lr_ratio;
  return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + std::cos(M_PI * progress));
}

double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  torch::NoGradGuard ng;
  double sq = 0;
  for (auto& p : params)
    if (p.grad().defined()) sq += p.grad().to(torch::kDouble).pow(2).sum().item<double>();
  const double norm = std::sqrt(sq);
  if (max_norm > 0 && norm > max_norm && std::isfinite(norm)) {
    const double scale = max_norm / (norm + 1e-6);
    for (auto& p : params)
      if (p.grad().defined()) p.mutable_grad().mul_(scale);
  }
  return norm;
}

}  // namespace moeforge
