// Building a RoutingPlan from per-token choices: capacity with the overflow rules of docs/routing.md section
// 1, then a counting sort by expert (no full sort, no [T, E] masks).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

#include "moeforge/routing/router.h"
#include "moeforge/util/error.h"

namespace moeforge {

std::vector<int64_t> RoutingPlan::offsets() const {
  auto off = expert_offsets.to(torch::kCPU).contiguous();
  const int64_t* p = off.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + off.numel());
}

int64_t RoutingPlan::unrouted_tokens(int64_t n_tokens) const {
  if (n_tokens <= 0) return 0;
  std::vector<char> seen(size_t(n_tokens), 0);
  auto tok = token_index.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* t = tok.data_ptr<int64_t>();
  int64_t routed = 0;
  for (int64_t i = 0; i < tok.numel(); ++i)
    if (t[i] >= 0 && t[i] < n_tokens && !seen[size_t(t[i])]) {
      seen[size_t(t[i])] = 1;
      ++routed;
    }
  return n_tokens - routed;
}

int64_t expert_capacity(double capacity_factor, int64_t n_tokens, int64_t k, int64_t n_expert) {
  if (capacity_factor <= 0) return 0;
  return static_cast<int64_t>(std::ceil(capacity_factor * double(n_tokens) * double(k) / double(n_expert)));
}

RoutingPlan build_plan_from_choices(const torch::Tensor& expert, const torch::Tensor& keep,
                                    const torch::Tensor& priority, const torch::Tensor& gate_tk,
                                    int64_t n_expert, int64_t capacity) {
  return build_plan_from_choices(expert, keep, priority, gate_tk, n_expert,
                                 std::vector<int64_t>(size_t(std::max<int64_t>(n_expert, 0)), capacity));
}

RoutingPlan build_plan_from_choices(const torch::Tensor& expert, const torch::Tensor& keep,
                                    const torch::Tensor& priority, const torch::Tensor& gate_tk,
                                    int64_t n_expert, const std::vector<int64_t>& capacity) {
  TORCH_CHECK(int64_t(capacity.size()) == n_expert, "build_plan_from_choices: ", capacity.size(),
              " capacities for ", n_expert, " experts");
  const bool capped = std::any_of(capacity.begin(), capacity.end(), [](int64_t c) { return c > 0; });
  TORCH_CHECK(expert.dim() == 2, "build_plan_from_choices: expert must be [T, K]");
  const int64_t T = expert.size(0), K = expert.size(1), E = n_expert;
  auto ex_t = expert.to(torch::kCPU, torch::kLong).contiguous();  // [T, K]
  const int64_t* ex = ex_t.data_ptr<int64_t>();
  torch::Tensor keep_t;
  const bool* kp = nullptr;
  if (keep.defined()) {
    keep_t = keep.to(torch::kCPU, torch::kBool).contiguous();  // [T, K]
    kp = keep_t.data_ptr<bool>();
  }

  std::vector<int64_t> count(E, 0);
  std::vector<uint8_t> kept(T * K, 0);
  int64_t requested = 0;
  if (!capped && !priority.defined()) {
    // Dropless: every requested choice is kept.
    for (int64_t p = 0; p < T * K; ++p) {
      if (kp && !kp[p]) continue;
      TORCH_CHECK(ex[p] >= 0 && ex[p] < E, "build_plan_from_choices: expert id out of range");
      ++requested;
      ++count[ex[p]];
      kept[p] = 1;
    }
  } else {
    // Serve first choices of all tokens before second choices; inside a rank, by token order or by
    // descending priority (Switch batch-prioritised routing; ties keep token order).
    std::vector<int64_t> order(T);
    std::iota(order.begin(), order.end(), 0);
    if (priority.defined()) {
      auto pr_t = priority.to(torch::kCPU, torch::kFloat).contiguous();
      const float* pr = pr_t.data_ptr<float>();
      std::stable_sort(order.begin(), order.end(), [pr](int64_t a, int64_t b) { return pr[a] > pr[b]; });
    }
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t t : order) {
        const int64_t p = t * K + k;
        if (kp && !kp[p]) continue;
        const int64_t e = ex[p];
        TORCH_CHECK(e >= 0 && e < E, "build_plan_from_choices: expert id out of range");
        ++requested;
        if (capacity[e] > 0 && count[e] >= capacity[e]) continue;  // dropped
        ++count[e];
        kept[p] = 1;
      }
    }
  }

  // Counting sort of kept choices by expert, ascending token order inside an expert.
  auto offsets_t = torch::empty({E + 1}, torch::kLong);
  int64_t* off = offsets_t.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) off[e + 1] = off[e] + count[e];
  const int64_t N = off[E];
  auto flat_pos_t = torch::empty({N}, torch::kLong);  // [N] position t*K + k
  auto token_t = torch::empty({N}, torch::kLong);     // [N]
  int64_t* fp = flat_pos_t.data_ptr<int64_t>();
  int64_t* tok = token_t.data_ptr<int64_t>();
  std::vector<int64_t> cursor(off, off + E);
  for (int64_t p = 0; p < T * K; ++p) {
    if (!kept[p]) continue;
    const int64_t slot = cursor[ex[p]]++;
    fp[slot] = p;
    tok[slot] = p / K;
  }

  RoutingPlan plan;
  const auto device = gate_tk.device();
  plan.token_index = token_t.to(device);
  plan.expert_offsets = offsets_t;
  plan.gate = gate_tk.reshape({T * K}).index_select(0, flat_pos_t.to(device));  // [N]
  plan.aux_loss = torch::zeros({}, gate_tk.options());
  plan.stats = make_routing_stats(std::move(count), T, requested);
  return plan;
}

}  // namespace moeforge

namespace moeforge {

void Router::register_expert_mask(int64_t n_expert) {
  expert_active_ = register_buffer("expert_active", torch::ones({n_expert}));
}

torch::Tensor Router::expert_mask() const {
  TORCH_CHECK(expert_active_.defined(), name(), ": this router has no expert mask");
  return expert_active_.to(torch::kCPU, torch::kFloat).clone();
}

std::vector<int64_t> Router::pruned_experts() const {
  auto a = expert_mask().contiguous();
  std::vector<int64_t> out;
  for (int64_t e = 0; e < a.numel(); ++e)
    if (a.data_ptr<float>()[e] == 0) out.push_back(e);
  return out;
}

void Router::set_expert_mask(const torch::Tensor& active) {
  TORCH_CHECK(expert_active_.defined(), name(), ": this router has no expert mask");
  auto a = active.to(torch::kCPU, torch::kFloat).reshape({-1});  // [E]
  if (a.numel() != n_expert())
    throw std::invalid_argument(name() + ": expert mask has " + std::to_string(a.numel()) + " entries for " +
                                std::to_string(n_expert()) + " experts");
  a = (a != 0).to(torch::kFloat);
  const int64_t n_active = a.sum().item<int64_t>();
  if (n_active < min_active_experts())
    throw std::invalid_argument(name() + ": pruning would leave " + std::to_string(n_active) +
                                " routable experts; this router needs at least " +
                                std::to_string(min_active_experts()));
  torch::NoGradGuard ng;
  expert_active_.copy_(a.to(expert_active_.device(), expert_active_.scalar_type()));
}

nlohmann::json Router::describe_state() const {
  nlohmann::json j = {{"router", name()}, {"experts", n_expert()}, {"causal", causal()}};
  if (expert_active_.defined()) j["pruned"] = pruned_experts();
  return j;
}

nlohmann::json Router::trace_fields(const RoutingPlan& /*plan*/, int64_t /*token*/,
                                    const std::vector<int64_t>& /*experts*/) const {
  return nlohmann::json::object();
}

void Router::set_sequence_centroids(const torch::Tensor& /*centroids*/, const torch::Tensor& /*sizes*/,
                                    const torch::Tensor& /*mean*/, const std::string& key) {
  throw ConfigError(key, "router '" + name() + "' of the first MoE layer has no sequence centroids to set");
}

bool Router::has_pruned() const {
  return expert_active_.defined() && (expert_active_ == 0).any().item<bool>();
}

torch::Tensor Router::selection_mask_bias(const torch::Tensor& like) const {
  auto active = expert_active_.to(like.device(), like.scalar_type());  // [E]
  return torch::zeros_like(active).masked_fill(active == 0, -std::numeric_limits<double>::infinity());
}

}  // namespace moeforge
