#include "moeforge/routing/measures.h"

#include <glpk.h>

#include <cmath>
#include <memory>
#include <stdexcept>

#include "moeforge/routing/stats.h"

namespace moeforge {

MaxVioAccumulator::MaxVioAccumulator(int64_t n_layer, int64_t n_expert)
    : total_(n_layer, std::vector<double>(n_expert, 0.0)), batch_sum_(n_layer, 0.0), n_batch_(n_layer, 0) {}

void MaxVioAccumulator::add(int64_t layer, const std::vector<int64_t>& load) {
  auto& tot = total_.at(layer);
  TORCH_CHECK(load.size() == tot.size(), "MaxVioAccumulator: load has ", load.size(), " experts, expected ",
              tot.size());
  std::vector<double> l(load.begin(), load.end());
  for (size_t e = 0; e < l.size(); ++e) tot[e] += l[e];
  batch_sum_[layer] += max_violation(l);
  ++n_batch_[layer];
}

double MaxVioAccumulator::batch(int64_t layer) const {
  return n_batch_.at(layer) > 0 ? batch_sum_[layer] / double(n_batch_[layer]) : 0.0;
}
double MaxVioAccumulator::global(int64_t layer) const {
  return max_violation(total_.at(layer));
}
double MaxVioAccumulator::batch_mean() const {
  double s = 0;
  for (size_t l = 0; l < total_.size(); ++l) s += batch(l);
  return total_.empty() ? 0.0 : s / double(total_.size());
}
double MaxVioAccumulator::global_mean() const {
  double s = 0;
  for (size_t l = 0; l < total_.size(); ++l) s += global(l);
  return total_.empty() ? 0.0 : s / double(total_.size());
}

void add_domain_counts(torch::Tensor& counts, const RoutingPlan& plan, const torch::Tensor& token_domain) {
  const int64_t E = plan.n_expert();
  auto tok = plan.token_index.to(torch::kCPU);                                           // [N]
  auto expert = torch::repeat_interleave(torch::arange(E), plan.expert_offsets.diff());  // [N]
  auto dom = token_domain.to(torch::kCPU, torch::kLong).index_select(0, tok);            // [N]
  counts.view({-1}).index_add_(0, dom * E + expert, torch::ones({tok.numel()}, counts.options()));
}

Specialisation domain_specialisation(const torch::Tensor& counts) {
  auto n = counts.to(torch::kCPU, torch::kDouble);  // [D, E]
  const int64_t E = n.size(1);
  Specialisation out;
  out.purity.assign(E, 0.0);
  const double total = n.sum().item<double>();
  if (total <= 0) return out;
  auto p = n / total;        // [D, E] joint
  auto pd = p.sum(1, true);  // [D, 1]
  auto pe = p.sum(0, true);  // [1, E]
  auto nz = p > 0;
  auto ratio = torch::where(nz, p / (pd * pe), torch::ones_like(p));
  const double mi = (p * ratio.log()).sum().item<double>();
  auto pd_nz = pd.masked_select(pd > 0);
  const double h = -(pd_nz * pd_nz.log()).sum().item<double>();
  out.mi_over_h = h > 0 ? mi / h : 0.0;
  auto col = n.sum(0);                // [E]
  auto best = std::get<0>(n.max(0));  // [E]
  for (int64_t e = 0; e < E; ++e) {
    const double c = col[e].item<double>();
    out.purity[e] = c > 0 ? best[e].item<double>() / c : 0.0;
  }
  return out;
}

BalancedOptimum solve_balanced_assignment(const torch::Tensor& scores, int64_t k, int64_t cap) {
  auto s = scores.detach().to(torch::kCPU, torch::kDouble).contiguous();  // [T, E]
  const int64_t T = s.size(0), E = s.size(1);
  TORCH_CHECK(k >= 1 && k <= E && cap >= 0, "solve_balanced_assignment: bad k or cap");
  TORCH_CHECK(E * cap >= T * k, "solve_balanced_assignment: infeasible, E*cap = ", E * cap,
              " < T*K = ", T * k);
  const double* sp = s.data_ptr<double>();
  std::unique_ptr<glp_prob, void (*)(glp_prob*)> lp(glp_create_prob(), glp_delete_prob);
  glp_set_obj_dir(lp.get(), GLP_MAX);
  // Rows 1..T: sum_e x_te = K. Rows T+1..T+E: sum_t x_te <= cap. Column t*E+e+1: x_te in [0, 1].
  glp_add_rows(lp.get(), int(T + E));
  for (int64_t t = 0; t < T; ++t) glp_set_row_bnds(lp.get(), int(t + 1), GLP_FX, double(k), double(k));
  for (int64_t e = 0; e < E; ++e) glp_set_row_bnds(lp.get(), int(T + e + 1), GLP_UP, 0.0, double(cap));
  glp_add_cols(lp.get(), int(T * E));
  std::vector<int> ia(1), ja(1);  // GLPK arrays are 1-based: element 0 is unused
  std::vector<double> ar(1);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      const int col = int(t * E + e + 1);
      glp_set_col_bnds(lp.get(), col, GLP_DB, 0.0, 1.0);
      glp_set_obj_coef(lp.get(), col, sp[t * E + e]);
      ia.push_back(int(t + 1)), ja.push_back(col), ar.push_back(1.0);
      ia.push_back(int(T + e + 1)), ja.push_back(col), ar.push_back(1.0);
    }
  glp_load_matrix(lp.get(), int(ia.size() - 1), ia.data(), ja.data(), ar.data());
  glp_smcp parm;
  glp_init_smcp(&parm);
  parm.msg_lev = GLP_MSG_OFF;
  const int rc = glp_simplex(lp.get(), &parm);
  if (rc != 0 || glp_get_status(lp.get()) != GLP_OPT)
    throw std::runtime_error("solve_balanced_assignment: GLPK simplex failed (rc " + std::to_string(rc) +
                             ", status " + std::to_string(glp_get_status(lp.get())) + ")");
  BalancedOptimum out;
  out.x = torch::empty({T, E}, torch::kDouble);
  double* xp = out.x.data_ptr<double>();
  for (int64_t c = 0; c < T * E; ++c) {
    const double v = glp_get_col_prim(lp.get(), int(c + 1));
    // Total unimodularity makes the simplex vertex integral; anything else is a solver failure.
    TORCH_CHECK(std::abs(v - std::round(v)) < 1e-6, "solve_balanced_assignment: non-integral vertex ", v);
    xp[c] = std::round(v);
  }
  out.objective = (out.x * s).sum().item<double>();
  return out;
}

OptimalityGap optimality_gap(const torch::Tensor& scores, const RoutingPlan& plan, int64_t k, int64_t cap) {
  OptimalityGap g;
  g.optimum = solve_balanced_assignment(scores, k, cap).objective;
  auto s = scores.detach().to(torch::kCPU, torch::kDouble);  // [T, E]
  const auto off = plan.offsets();
  auto tok = plan.token_index.to(torch::kCPU);
  for (int64_t e = 0; e + 1 < int64_t(off.size()); ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n > 0)
      g.router_objective += s.select(1, e).index_select(0, tok.narrow(0, off[e], n)).sum().item<double>();
    if (cap > 0) g.capacity_violation = std::max(g.capacity_violation, double(n - cap) / double(cap));
  }
  g.gap = g.optimum > 0 ? (g.optimum - g.router_objective) / g.optimum : 0.0;
  return g;
}

LeakResult causal_leak(const std::function<torch::Tensor(const torch::Tensor&)>& forward,
                       const torch::Tensor& x, const LeakOptions& opt) {
  TORCH_CHECK(x.dim() == 3, "causal_leak: x must be [B, S, C]");
  const int64_t B = x.size(0), S = x.size(1), C = x.size(2);
  TORCH_CHECK(S >= 2, "causal_leak: needs at least 2 positions");
  torch::NoGradGuard ng;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(opt.seed);
  LeakResult r;
  uint64_t trial_seed = opt.seed * 1000003 + 17;
  auto pass = [&](const torch::Tensor& input, uint64_t seed) {
    torch::manual_seed(seed);  // the router's noise (noisy top-K, GShard's draw) is the same in both passes
    return forward(input);
  };
  for (int64_t b = 0; b < std::min(opt.sequences, B); ++b)
    for (double f : opt.cuts) {
      const int64_t p = std::clamp<int64_t>(int64_t(std::floor(f * double(S - 1))), 0, S - 2);
      for (int64_t d = 0; d < opt.draws; ++d)
        for (int mode = 0; mode < (opt.other_rows && B > 1 ? 2 : 1); ++mode) {
          ++trial_seed;
          auto x2 = x.clone();  // [B, S, C]
          auto rep =
              opt.scale * torch::randn({B, S - p - 1, C}, gen, torch::TensorOptions().dtype(x.dtype()));
          for (int64_t row = 0; row < B; ++row)
            if ((mode == 0) == (row == b)) x2.select(0, row).narrow(0, p + 1, S - p - 1).copy_(rep[row]);
          auto y1 = pass(x, trial_seed).narrow(1, 0, p + 1);   // [B, p+1, C]
          auto y2 = pass(x2, trial_seed).narrow(1, 0, p + 1);  // [B, p+1, C]
          const double diff = (y1 - y2).abs().max().item<double>();
          (mode == 0 ? r.same_row : r.other_rows) = std::max(mode == 0 ? r.same_row : r.other_rows, diff);
          ++r.trials;
        }
    }
  return r;
}

}  // namespace moeforge
