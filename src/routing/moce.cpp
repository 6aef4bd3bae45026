// MoCE dual-stage routing, ROUTING.md section 6. See the header for the legend.
#include "moeforge/routing/moce.h"

#include <cmath>
#include <limits>
#include <stdexcept>

#include "moeforge/routing/losses.h"

namespace moeforge {

namespace {

torch::Tensor unit_rows(const torch::Tensor& v) {  // [M, D] -> rows of norm 1 (zero rows stay zero)
  return v / v.norm(2, {1}, true).clamp_min(1e-12);
}

// Switch balance loss over each group's full softmax, on the tokens routed in that group, averaged over the
// groups that have tokens. (The reference's loss took a softmax over only the selected logits: the
// constant E/K, no gradient. This one has the gradient of the Switch loss.)
torch::Tensor group_balance_loss(const torch::Tensor& probs, const torch::Tensor& choices,
                                 const std::vector<torch::Tensor>& rows_of) {
  auto loss = torch::zeros({}, probs.options());
  int64_t used = 0;
  for (const auto& rows : rows_of) {
    if (!rows.defined()) continue;
    loss = loss + switch_balance_loss(probs.index_select(0, rows), choices.index_select(0, rows));
    ++used;
  }
  return used > 0 ? loss / double(used) : loss;
}

}  // namespace

MoCERouterImpl::MoCERouterImpl(const MoEConfig& cfg, int64_t d_model)
    : cfg_(cfg),
      n_expert_(cfg.routed_experts()),
      n_cluster_(cfg.n_cluster),
      n_per_group_((cfg.routed_experts() - cfg.moce_n_general) / std::max<int64_t>(cfg.n_cluster, 1)),
      n_general_(cfg.moce_n_general),
      k_(cfg.routed_used()),
      k_general_(cfg.moce_n_general > 0 ? cfg.moce_general_used : 0) {
  cfg_.validate();
  // nn.Linear's default initialisation, as the top-K router.
  const double bound = 1.0 / std::sqrt(double(d_model));
  group_weight = register_parameter(
      "group_weight", torch::empty({n_cluster_, n_per_group_, d_model}).uniform_(-bound, bound));
  if (n_general_ > 0)
    general_weight =
        register_parameter("general_weight", torch::empty({n_general_, d_model}).uniform_(-bound, bound));
  centroids = register_buffer("centroids", torch::zeros({n_cluster_, d_model}));
  centroid_count = register_buffer("centroid_count", torch::zeros({n_cluster_}, torch::kDouble));
  expert_count = register_buffer("expert_count", torch::zeros({n_expert_}, torch::kDouble));
  pooled_mean = register_buffer("pooled_mean", torch::zeros({d_model}));
  pooled_mean_count = register_buffer("pooled_mean_count", torch::zeros({1}, torch::kDouble));
  register_expert_mask(n_expert_);
}

torch::Tensor MoCERouterImpl::embed(const torch::Tensor& pooled) const {
  torch::NoGradGuard ng;
  auto p = pooled.to(centroids.dtype());
  // Mean-pooled hidden states share one dominant direction (frequent words, the residual stream's bias), so
  // raw cosines are all close to 1 and online k-means puts nearly every sequence in one cluster. Centring
  // on the running mean of pooled vectors (as sentence-embedding practice does) leaves the part that tells
  // sequences apart. Before any mean is known (the very first batch), the batch's own mean is used.
  auto center =
      pooled_mean_count.item<double>() > 0 ? pooled_mean.to(p.device()).unsqueeze(0) : p.mean(0, true);
  return unit_rows(p - center);
}

void MoCERouterImpl::set_centroids(const torch::Tensor& c, const torch::Tensor& sizes,
                                   const torch::Tensor& mean) {
  TORCH_CHECK(c.dim() == 2 && c.size(0) == n_cluster_ && c.size(1) == centroids.size(1),
              "moce: set_centroids expects [", n_cluster_, ", ", centroids.size(1), "], got ", c.sizes());
  TORCH_CHECK(sizes.numel() == n_cluster_, "moce: set_centroids expects ", n_cluster_, " sizes");
  torch::NoGradGuard ng;
  centroids.copy_(unit_rows(c.to(centroids.device(), centroids.scalar_type())));
  // A count of at least 1 marks every centroid initialised, even one whose cluster came out empty.
  centroid_count.copy_(sizes.to(centroid_count.device(), centroid_count.scalar_type()).clamp_min(1.0));
  if (mean.defined()) {
    pooled_mean.copy_(mean.to(pooled_mean.device(), pooled_mean.scalar_type()));
    pooled_mean_count.fill_(sizes.sum().item<double>());
  }
}

void MoCERouterImpl::set_expert_mask(const torch::Tensor& active) {
  auto a = active.to(torch::kCPU, torch::kFloat).reshape({-1});
  if (a.numel() == n_expert_) {
    auto groups = (a.narrow(0, 0, n_cluster_ * n_per_group_) != 0).view({n_cluster_, n_per_group_}).sum(1);
    for (int64_t g = 0; g < n_cluster_; ++g)
      if (groups[g].item<int64_t>() < k_)
        throw std::invalid_argument("moce: pruning would leave cluster " + std::to_string(g) + " with " +
                                    std::to_string(groups[g].item<int64_t>()) +
                                    " routable experts; it needs moe.n_expert_used = " + std::to_string(k_));
    if (n_general_ > 0 &&
        (a.narrow(0, n_cluster_ * n_per_group_, n_general_) != 0).sum().item<int64_t>() < k_general_)
      throw std::invalid_argument(
          "moce: pruning would leave fewer general experts than moe.moce_general_used");
  }
  Router::set_expert_mask(a);
}

torch::Tensor MoCERouterImpl::assign(const torch::Tensor& pooled) const {
  torch::NoGradGuard ng;
  auto sims = torch::matmul(embed(pooled), centroids.to(pooled.device()).t());  // [B, G]
  // Uninitialised centroids (count 0) do not compete.
  auto init = (centroid_count.to(pooled.device()) > 0);  // [G]
  if (!init.any().item<bool>()) return torch::zeros({pooled.size(0)}, torch::kLong);
  sims = sims.masked_fill(~init.unsqueeze(0), -std::numeric_limits<float>::infinity());
  return sims.argmax(1).to(torch::kCPU, torch::kLong);
}

void MoCERouterImpl::seed_centroids(const torch::Tensor& unit) {
  torch::NoGradGuard ng;
  auto count = centroid_count.cpu();
  for (int64_t g = 0; g < n_cluster_; ++g) {
    if (count[g].item<double>() > 0) continue;
    auto init = (count > 0).to(unit.device());  // [G]
    int64_t row = 0;
    if (init.any().item<bool>()) {
      // Farthest point: the sequence whose best similarity to an initialised centroid is lowest.
      auto sims = torch::matmul(unit, centroids.t().to(unit.dtype()));                       // [B, G]
      sims = sims.masked_fill(~init.unsqueeze(0), -std::numeric_limits<float>::infinity());  // [B, G]
      row = std::get<0>(sims.max(1)).argmin().item<int64_t>();
    }
    centroids[g].copy_(unit[row]);
    count[g] = 1.0;
    centroid_count.copy_(count);
  }
}

torch::Tensor MoCERouterImpl::assign_balanced(const torch::Tensor& unit) const {
  // Online k-means with one nearest-centroid rule lets the centroid nearest the data's centre absorb most
  // sequences (seen on Brown: ~80% in one of 4 clusters), and a group then holds most of the traffic.
  // In training each centroid takes at most ceil(B / G) sequences of the batch: pairs (sequence, cluster)
  // are served greedily by similarity, the balanced-assignment step of balanced k-means. Evaluation and
  // generation keep the plain nearest centroid.
  auto sims = torch::matmul(unit, centroids.t().to(unit.dtype())).to(torch::kCPU, torch::kDouble);  // [B, G]
  const int64_t B = sims.size(0), G = n_cluster_, cap = (B + G - 1) / G;
  auto init = (centroid_count.cpu() > 0);
  std::vector<std::tuple<double, int64_t, int64_t>> pairs;
  auto acc = sims.accessor<double, 2>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g)
      if (init[g].item<bool>()) pairs.emplace_back(acc[b][g], b, g);
  std::stable_sort(pairs.begin(), pairs.end(),
                   [](auto& a, auto& b) { return std::get<0>(a) > std::get<0>(b); });
  std::vector<int64_t> id(B, -1), load(G, 0);
  int64_t n_init = 0;
  for (int64_t g = 0; g < G; ++g) n_init += init[g].item<bool>();
  const int64_t cap_init = n_init > 0 ? (B + n_init - 1) / n_init : B;
  for (auto& [s, b, g] : pairs) {
    (void)s;
    if (id[b] < 0 && load[g] < std::max(cap, cap_init)) {
      id[b] = g;
      ++load[g];
    }
  }
  for (auto& v : id) v = std::max<int64_t>(v, 0);
  return torch::tensor(id, torch::kLong);
}

RoutingPlan MoCERouterImpl::route(const torch::Tensor& x, const RouteContext& ctx) {
  const int64_t T = x.size(0), C = x.size(1), G = n_cluster_, Eg = n_per_group_;
  const int64_t B = ctx.seq_len > 0 ? T / ctx.seq_len : 1, S = T / B;
  TORCH_CHECK(B * S == T, "moce: T = ", T, " is not a multiple of seq_len = ", ctx.seq_len);
  const auto dev = x.device();

  // Stage 1: one cluster id per sequence.
  auto pooled = x.detach().view({B, S, C}).mean(1);  // [B, C] stop-gradient mean pool
  auto unit = embed(pooled);                         // [B, C] centred, unit rows
  torch::Tensor ids;                                 // [B] int64 CPU
  if (ctx.seq_cluster.defined()) {
    ids = ctx.seq_cluster.to(torch::kCPU, torch::kLong).reshape({-1});
    TORCH_CHECK(ids.numel() == B, "moce: ctx.seq_cluster has ", ids.numel(), " ids for ", B, " sequences");
    TORCH_CHECK(ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < G,
                "moce: ctx.seq_cluster ids must be in [0, ", G, ")");
  } else {
    if (ctx.training) {
      seed_centroids(unit);
      ids = assign_balanced(unit);
    } else {
      ids = assign(pooled);
    }
  }
  if (ctx.training) {
    // Online centroids move in after_step, from every batch routed since the last step.
    torch::NoGradGuard ng;
    if (!pending_sum_.defined() || pending_sum_.device() != dev) {
      pending_sum_ = torch::zeros({G, C}, torch::TensorOptions().dtype(torch::kDouble).device(dev));
      pending_n_ = torch::zeros({G}, torch::kDouble);
      pending_pool_sum_ = torch::zeros({C}, torch::TensorOptions().dtype(torch::kDouble).device(dev));
    }
    pending_pool_sum_.add_(pooled.to(torch::kDouble).sum(0));
    pending_sum_.index_add_(0, ids.to(dev), unit.to(torch::kDouble));
    pending_n_.index_add_(0, ids, torch::ones({B}, torch::kDouble));
  }

  // Stage 2: top-K inside the sequence's group, with that group's router over its Eg experts only.
  auto tok_cluster = ids.unsqueeze(1).expand({B, S}).reshape({T});  // [T] CPU
  std::vector<torch::Tensor> rows_of(G), logit_parts;
  for (int64_t g = 0; g < G; ++g) {
    auto rows = (tok_cluster == g).nonzero().squeeze(1);  // [n_g]
    if (rows.numel() == 0) continue;
    rows_of[g] = rows.to(dev);
    logit_parts.push_back(torch::matmul(x.index_select(0, rows_of[g]), group_weight[g].t()));  // [n_g, Eg]
  }
  std::vector<torch::Tensor> idx_parts;
  for (auto& r : rows_of)
    if (r.defined()) idx_parts.push_back(r);
  auto z = torch::zeros({T, Eg}, x.options()).index_copy(0, torch::cat(idx_parts), torch::cat(logit_parts));
  auto p = torch::softmax(z, 1);  // [T, Eg] full softmax inside the group
  torch::Tensor gate, local;      // [T, K]
  const bool pruned = has_pruned();
  torch::Tensor mask_bias;  // [E] 0 / -inf (router.h: pruning masks the selection, not the scores)
  if (pruned) {
    mask_bias = selection_mask_bias(p);
    auto bias_local = mask_bias.narrow(0, 0, G * Eg).view({G, Eg}).index_select(0, tok_cluster.to(dev));
    local = std::get<1>((p.detach() + bias_local).topk(k_, 1));  // [T, Eg] bias of each token's group
    gate = p.gather(1, local);
  } else {
    auto top = p.topk(k_, 1);
    gate = std::get<0>(top);
    local = std::get<1>(top);
  }
  auto choices = tok_cluster.to(dev).unsqueeze(1) * Eg + local;  // [T, K] global ids
  // Renormalise over the K selected only when K >= 2: with K = 1 it would be the constant 1 and the router
  // would get no gradient (the reference's K = 1 defect).
  if (cfg_.renormalize && k_ >= 2) gate = gate / gate.sum(1, true);
  auto loss = torch::zeros({}, x.options());
  if (cfg_.balance_coef > 0) loss = loss + cfg_.balance_coef * group_balance_loss(p, local, rows_of);
  if (cfg_.z_loss_coef > 0) loss = loss + cfg_.z_loss_coef * router_z_loss(z);

  if (n_general_ > 0) {
    // General experts: a cluster-independent router over the last n_general experts, for every token.
    auto zg = torch::matmul(x, general_weight.t());  // [T, n_general]
    auto pg = torch::softmax(zg, 1);
    torch::Tensor gate_g, local_g;  // [T, Kg]
    if (pruned) {
      local_g = std::get<1>((pg.detach() + mask_bias.narrow(0, G * Eg, n_general_)).topk(k_general_, 1));
      gate_g = pg.gather(1, local_g);
    } else {
      auto topg = pg.topk(k_general_, 1);
      gate_g = std::get<0>(topg);
      local_g = std::get<1>(topg);
    }
    if (cfg_.renormalize && k_general_ >= 2) gate_g = gate_g / gate_g.sum(1, true);
    choices = torch::cat({choices, local_g + G * Eg}, 1);
    gate = torch::cat({gate, gate_g}, 1);
    if (cfg_.balance_coef > 0) loss = loss + cfg_.balance_coef * switch_balance_loss(pg, local_g);
    if (cfg_.z_loss_coef > 0) loss = loss + cfg_.z_loss_coef * router_z_loss(zg);
  }

  torch::Tensor priority;
  if (cfg_.overflow == OverflowOrder::kBatchPrioritized && cfg_.capacity_factor > 0)
    priority = std::get<0>(gate.detach().cpu().max(1));
  // Capacity as section 1 over all of a token's choices; a group's experts only see its sequences' tokens.
  const int64_t cap = expert_capacity(cfg_.capacity_factor, T, k_ + k_general_, n_expert_);
  RoutingPlan plan = build_plan_from_choices(choices.cpu(), {}, priority, gate, n_expert_, cap);
  plan.aux_loss = loss;
  plan.seq_cluster = ids;
  {
    torch::NoGradGuard ng;
    auto le =
        torch::tensor(std::vector<double>(plan.stats.load.begin(), plan.stats.load.end()), torch::kDouble);
    expert_count.add_(le.to(expert_count.device()));
  }
  return plan;
}

void MoCERouterImpl::after_step(const RoutingPlan& /*plan*/) {
  if (!pending_sum_.defined()) return;
  torch::NoGradGuard ng;
  auto count = centroid_count.cpu();
  auto n = pending_n_;
  const double d = cfg_.centroid_decay;
  for (int64_t g = 0; g < n_cluster_; ++g) {
    const double ng_ = n[g].item<double>();
    if (ng_ == 0) continue;
    auto dir = unit_rows((pending_sum_[g] / ng_).unsqueeze(0)).squeeze(0).to(centroids.dtype());  // [C]
    auto c = centroids[g];
    auto next = count[g].item<double>() > 0 ? d * c + (1 - d) * dir : dir;
    // Spherical k-means keeps centroids on the unit sphere; so does its online (EMA) form.
    c.copy_(unit_rows(next.unsqueeze(0)).squeeze(0));
    count[g] = count[g].item<double>() + ng_;
  }
  centroid_count.copy_(count);
  // The running mean of pooled vectors that embed() centres on.
  const double n_seq = n.sum().item<double>();
  auto batch_mean = (pending_pool_sum_ / n_seq).to(pooled_mean.dtype());
  if (pooled_mean_count.item<double>() > 0)
    pooled_mean.mul_(d).add_(batch_mean, 1 - d);
  else
    pooled_mean.copy_(batch_mean);
  pooled_mean_count.add_(n_seq);
  pending_sum_.zero_();
  pending_n_.zero_();
  pending_pool_sum_.zero_();
}

}  // namespace moeforge
