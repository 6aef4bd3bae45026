// MoCE dual-stage routing, docs/routing.md section 6. See the header for the legend.
#include "moeforge/routing/moce.h"

#include <cmath>
#include <limits>
#include <stdexcept>

#include "moeforge/config/binder.h"
#include "moeforge/routing/losses.h"
#include "moeforge/util/error.h"
#include "option_checks.h"

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
      n_per_group_((cfg.routed_experts() - cfg.moce.n_general) / std::max<int64_t>(cfg.n_cluster, 1)),
      n_general_(cfg.moce.n_general),
      k_(cfg.routed_used()),
      k_general_(cfg.moce.n_general > 0 ? cfg.moce.general_used : 0) {
  // nn.Linear's default initialisation, as the top-K router.
  const double bound = 1.0 / std::sqrt(double(d_model));
  group_weight = register_parameter(
      "group_weight", torch::empty({n_cluster_, n_per_group_, d_model}).uniform_(-bound, bound));
  if (n_general_ > 0)
    general_weight =
        register_parameter("general_weight", torch::empty({n_general_, d_model}).uniform_(-bound, bound));
  if (cfg.moce.assign == MoceAssign::kGate)
    seq_gate = register_parameter("seq_gate", torch::empty({n_cluster_, d_model}).uniform_(-bound, bound));
  centroids = register_buffer("centroids", torch::zeros({n_cluster_, d_model}));
  cluster_bias = register_buffer("cluster_bias", torch::zeros({n_cluster_}));
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
  // sequences apart. Before any mean is known nothing is subtracted: centring on the batch's own mean would
  // make one sequence's cluster depend on the others in its batch.
  if (pooled_mean_count.item<double>() > 0) p = p - pooled_mean.to(p.device()).unsqueeze(0);
  return unit_rows(p);
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

void MoCERouterImpl::set_sequence_centroids(const torch::Tensor& c, const torch::Tensor& sizes,
                                            const torch::Tensor& mean, const std::string& /*key*/) {
  set_centroids(c, sizes, mean);
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

torch::Tensor MoCERouterImpl::cluster_scores(const torch::Tensor& unit) const {
  torch::NoGradGuard ng;
  auto sims = torch::matmul(unit, centroids.to(unit.device(), unit.scalar_type()).t());  // [M, G]
  sims = sims + cluster_bias.to(sims.device(), sims.scalar_type()).unsqueeze(0);
  // Uninitialised centroids (count 0) do not compete.
  auto init = (centroid_count.to(sims.device()) > 0);  // [G]
  return sims.masked_fill(~init.unsqueeze(0), -std::numeric_limits<double>::infinity());
}

torch::Tensor MoCERouterImpl::assign(const torch::Tensor& pooled) const {
  torch::NoGradGuard ng;
  if (!(centroid_count > 0).any().item<bool>()) return torch::zeros({pooled.size(0)}, torch::kLong);
  return cluster_scores(embed(pooled)).argmax(1).to(torch::kCPU, torch::kLong);
}

std::pair<torch::Tensor, torch::Tensor> MoCERouterImpl::gate_assign(const torch::Tensor& pooled) const {
  auto logits = torch::matmul(pooled.detach().to(seq_gate.scalar_type()), seq_gate.t());  // [M, G]
  torch::Tensor ids;
  {
    torch::NoGradGuard ng;
    ids = (logits + cluster_bias.to(logits.device(), logits.scalar_type()).unsqueeze(0)).argmax(1);
  }
  auto p = torch::softmax(logits, 1).gather(1, ids.unsqueeze(1)).squeeze(1);  // [M]
  // 1 in value exactly (also where p underflows to 0), with the gradient of p / p.
  const auto p0 = p.detach();
  return {ids.to(torch::kCPU, torch::kLong), 1.0 + (p - p0) / p0.clamp_min(1e-12)};
}

torch::Tensor MoCERouterImpl::prefix_pool(const torch::Tensor& x, int64_t B, int64_t S,
                                          const torch::Tensor& before_sum, int64_t before,
                                          const torch::Tensor& prompt_len) const {
  torch::NoGradGuard ng;
  const int64_t C = x.size(1);
  auto sum = x.detach().view({B, S, C}).cumsum(1);  // [B, S, C] sums over this chunk up to each position
  if (before_sum.defined()) {
    TORCH_CHECK(before_sum.dim() == 2 && before_sum.size(0) == B && before_sum.size(1) == C,
                "moce: the cached pool sum must be [", B, ", ", C, "]");
    sum = sum + before_sum.to(sum.device(), sum.scalar_type()).unsqueeze(1);
  }
  auto n = torch::arange(1, S + 1, sum.options()).add_(double(before)).view({1, S, 1});  // [1, S, 1]
  if (!prompt_len.defined()) return sum / n;                                             // [B, S, C]
  // Prompt pool: only positions before prompt_len[b] (absolute) are summed; the count stops there too.
  auto x_in = x.detach().view({B, S, C}) * prompt_mask(B, S, before, prompt_len, x.options()).unsqueeze(2);
  auto psum = x_in.cumsum(1);  // [B, S, C]
  if (before_sum.defined()) psum = psum + before_sum.to(psum.device(), psum.scalar_type()).unsqueeze(1);
  auto len = prompt_len.to(x.device(), x.scalar_type()).view({B, 1, 1}).clamp_min(1.0);  // [B, 1, 1]
  return psum / torch::minimum(n, len);                                                  // [B, S, C]
}

torch::Tensor MoCERouterImpl::prompt_mask(int64_t B, int64_t S, int64_t before,
                                          const torch::Tensor& prompt_len,
                                          const torch::TensorOptions& opt) const {
  TORCH_CHECK(prompt_len.numel() == B, "moce: the prompt lengths are ", prompt_len.numel(), " for ", B,
              " sequences");
  auto pos = torch::arange(S, opt.dtype(torch::kLong)).add_(before).view({1, S});         // absolute
  return (pos < prompt_len.to(opt.device(), torch::kLong).view({B, 1})).to(opt.dtype());  // [B, S]
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

MoCERouterImpl::MoceStage1 MoCERouterImpl::assign_clusters(const torch::Tensor& x, const RouteContext& ctx,
                                                           int64_t B, int64_t S) const {
  // Stage 1: a cluster id per token. Passed on by an earlier MoCE layer (MoceCarry), kept from the prompt of
  // a generation (MoceCache::seq_cluster), or assigned here: nearest centroid (cosine) plus the balancing
  // bias, of the running prefix pool (causal, the default) or of the whole sequence's pool (non-causal).
  // The same rule runs in training, evaluation and generation, and route() changes no buffer.
  const int64_t T = x.size(0), C = x.size(1), G = n_cluster_;
  const auto dev = x.device();
  const auto* carry = dynamic_cast<const MoceCarry*>(ctx.carry.get());
  const auto* cache = dynamic_cast<const MoceCache*>(ctx.cache.get());
  MoceStage1 st;
  st.next = std::make_shared<MoceCache>();
  auto& tok_cluster = st.tok_cluster;
  auto& seq_pool = st.seq_pool;
  auto& gate_scale = st.gate_scale;
  auto& next = st.next;
  const bool by_gate = cfg_.moce.assign == MoceAssign::kGate;
  const bool grad_on = torch::GradMode::is_enabled();  // the gate learns when the forward does
  // The cluster of each row of a pool: the learned gate's (keeping its straight-through scale per token),
  // or the nearest centroid's (group 0 before any centroid exists).
  auto assign_rows = [&](const torch::Tensor& pooled, int64_t repeat) {
    if (by_gate) {
      torch::AutoGradMode mode(grad_on);  // inside the stage-1 no-grad block: the gate's own product
      auto [ids, scale] = gate_assign(pooled);
      gate_scale = repeat > 1 ? scale.unsqueeze(1).expand({-1, repeat}).reshape({-1}) : scale;
      return ids;
    }
    return (centroid_count > 0).any().item<bool>() ? assign(pooled)
                                                   : torch::zeros({pooled.size(0)}, torch::kLong);
  };
  {
    torch::NoGradGuard ng;
    seq_pool = x.detach().view({B, S, C}).mean(1);
    if (carry && !cfg_.moce.cluster_per_layer) {
      tok_cluster = carry->token_cluster.to(torch::kCPU, torch::kLong).reshape({-1});
      TORCH_CHECK(tok_cluster.numel() == T, "moce: the earlier layer's token clusters are ",
                  tok_cluster.numel(), " ids for ", T, " tokens");
      next.reset();
    } else if (cache && cache->seq_cluster.defined()) {
      auto ids = cache->seq_cluster.to(torch::kCPU, torch::kLong).reshape({-1});
      TORCH_CHECK(ids.numel() == B, "moce: the sequence clusters are ", ids.numel(), " ids for ", B,
                  " sequences");
      tok_cluster = ids.unsqueeze(1).expand({B, S}).reshape({T}).clone();
      next->seq_cluster = ids;
    } else if (cfg_.moce.pool == MocePool::kPrefix || cfg_.moce.pool == MocePool::kPrompt) {
      // The prompt pool needs the prompts' lengths; without them (plain text) it is the prefix pool.
      const bool prompt = cfg_.moce.pool == MocePool::kPrompt && ctx.prompt_len.defined();
      const torch::Tensor before_sum = cache ? cache->pool_sum : torch::Tensor();
      const int64_t before = cache && cache->pool_sum.defined() ? cache->len : 0;
      const torch::Tensor prompt_len = prompt ? ctx.prompt_len : torch::Tensor();
      tok_cluster = assign_rows(prefix_pool(x, B, S, before_sum, before, prompt_len).reshape({T, C}), 1);
      auto xs = x.detach().view({B, S, C});
      if (prompt) {
        xs = xs * prompt_mask(B, S, before, prompt_len, x.options()).unsqueeze(2);
        // What the centroids learn from: the prompt's mean (the cluster's own definition).
        seq_pool = xs.sum(1) / ctx.prompt_len.to(dev, x.scalar_type()).view({B, 1}).clamp_min(1.0);
      }
      next->pool_sum = xs.sum(1);
      if (before_sum.defined())
        next->pool_sum = next->pool_sum + before_sum.to(dev, next->pool_sum.scalar_type());
      next->len = before + S;
    } else {
      // NON-CAUSAL: the whole sequence's mean decides every position's cluster; a generation keeps the
      // cluster its prompt gave it.
      auto ids = assign_rows(seq_pool, S);  // [B]
      tok_cluster = ids.unsqueeze(1).expand({B, S}).reshape({T}).clone();
      next->seq_cluster = ids;
    }
    TORCH_CHECK(tok_cluster.min().item<int64_t>() >= 0 && tok_cluster.max().item<int64_t>() < G,
                "moce: cluster ids must be in [0, ", G, ")");
  }
  return st;
}

RoutingPlan MoCERouterImpl::route(const torch::Tensor& x, const RouteContext& ctx) {
  const int64_t T = x.size(0), G = n_cluster_, Eg = n_per_group_;
  const int64_t B = ctx.seq_len > 0 ? T / ctx.seq_len : 1, S = T / B;
  TORCH_CHECK(B * S == T, "moce: T = ", T, " is not a multiple of seq_len = ", ctx.seq_len);
  const auto dev = x.device();
  auto [tok_cluster, seq_pool, gate_scale, next] = assign_clusters(x, ctx, B, S);

  // Stage 2: top-K inside the token's group, with that group's router over its Eg experts only.
  std::vector<torch::Tensor> rows_of(G), logit_parts, idx_parts;
  for (int64_t g = 0; g < G; ++g) {
    auto rows = (tok_cluster == g).nonzero().squeeze(1);  // [n_g]
    if (rows.numel() == 0) continue;
    rows_of[g] = rows.to(dev);
    idx_parts.push_back(rows_of[g]);
    logit_parts.push_back(torch::matmul(x.index_select(0, rows_of[g]), group_weight[g].t()));  // [n_g, Eg]
  }
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
  // Capacity as section 1, for the group experts and the general experts apart: a group expert's share is
  // K of the T tokens over the G * Eg group experts, a general expert's K_general over n_general.
  std::vector<int64_t> cap(n_expert_, expert_capacity(cfg_.capacity_factor, T, k_, G * Eg));
  for (int64_t e = G * Eg; e < n_expert_; ++e)
    cap[e] = expert_capacity(cfg_.capacity_factor, T, k_general_, n_general_);
  RoutingPlan plan = build_plan_from_choices(choices.cpu(), {}, priority, gate, n_expert_, cap);
  // MaxVio, CV, entropy and dead experts over the group experts only: the general experts serve every
  // token and are not balanced against them (2 general of 16 put MaxVio near 2 at perfect balance).
  plan.stats = make_routing_stats(plan.stats.load, T, plan.stats.n_requested, G * Eg);
  std::vector<int64_t> group_load(G, 0);
  {
    auto tc = tok_cluster.contiguous();
    const int64_t* pc = tc.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) ++group_load[pc[t]];
  }
  plan.stats.group_load = std::move(group_load);
  plan.aux_loss = loss;
  if (gate_scale.defined()) plan.token_scale = gate_scale;
  // For after_step: each sequence's representation and the cluster its last position took.
  plan.sequence_rows = {seq_pool, tok_cluster.view({B, S}).select(1, S - 1).contiguous()};
  auto carried = std::make_shared<MoceCarry>();
  carried->token_cluster = tok_cluster;
  plan.carry = carried;
  plan.cache = next;
  return plan;
}

void MoCERouterImpl::after_step(const RouteFeedback& fb) {
  if (fb.empty()) return;
  torch::NoGradGuard ng;
  {
    auto le = torch::tensor(std::vector<double>(fb.load.begin(), fb.load.end()), torch::kDouble);
    expert_count.add_(le.to(expert_count.device()));
  }
  if (fb.sequence_rows.empty()) return;
  // route()'s sequence rows: each sequence's representation [B, C] and its last position's cluster [B].
  auto pooled = fb.all_sequence_rows(0).to(centroids.device(), centroids.scalar_type());  // [B, C]
  auto ids = fb.all_sequence_rows(1).to(torch::kCPU, torch::kLong);                       // [B]
  const double d = cfg_.moce.centroid_decay;
  const int64_t G = n_cluster_, B = pooled.size(0);
  auto batch_mean = pooled.mean(0).to(pooled_mean.dtype());
  if (pooled_mean_count.item<double>() == 0) {
    pooled_mean.copy_(batch_mean);  // the first step: centre on its own mean from now on
    pooled_mean_count.fill_(double(B));
  }
  auto unit = embed(pooled);  // [B, C], centred on the mean the step was routed with
  if ((centroid_count == 0).any().item<bool>()) {
    // Seed every uninitialised centroid from the step's sequences (farthest point); the sequences then
    // update their nearest centroid.
    seed_centroids(unit);
    ids = cluster_scores(unit).argmax(1).to(torch::kCPU, torch::kLong);
  }

  // Online clustering: each centroid moves toward the mean direction of the sequences it took (an EMA on
  // the unit sphere, the online form of spherical k-means).
  auto sum = torch::zeros({G, unit.size(1)}, unit.options().dtype(torch::kDouble))
                 .index_add_(0, ids.to(unit.device()), unit.to(torch::kDouble));  // [G, C]
  auto n = torch::zeros({G}, torch::kDouble).index_add_(0, ids, torch::ones({B}, torch::kDouble));
  auto count = centroid_count.cpu();
  for (int64_t g = 0; g < G; ++g) {
    const double ng_ = n[g].item<double>();
    if (ng_ == 0) continue;
    auto dir = unit_rows((sum[g] / ng_).unsqueeze(0)).squeeze(0).to(centroids.dtype());  // [C]
    auto c = centroids[g];
    c.copy_(unit_rows((d * c + (1 - d) * dir).unsqueeze(0)).squeeze(0));
    count[g] = count[g].item<double>() + ng_;
  }
  centroid_count.copy_(count);
  // The running mean of pooled vectors that embed() centres on.
  pooled_mean.mul_(d).add_(batch_mean, 1 - d);
  pooled_mean_count.add_(double(B));

  // Cluster balance: a loss-free-style bias on the centroid scores (docs/routing.md, MoCE), stepped from
  // the tokens each cluster took this step. Every routing (training, evaluation, generation) adds it.
  if (!fb.group_load.empty() && cfg_.moce.balance_rate > 0) {
    double mean = 0;
    for (int64_t v : fb.group_load) mean += double(v);
    mean /= double(fb.group_load.size());
    auto step = torch::zeros({G}, torch::kDouble);
    for (int64_t g = 0; g < G; ++g) {
      const double diff = mean - double(fb.group_load[g]);
      step[g] = diff > 0 ? 1.0 : (diff < 0 ? -1.0 : 0.0);
    }
    cluster_bias.add_(step.to(cluster_bias.device(), cluster_bias.scalar_type()), cfg_.moce.balance_rate);
  }
}

torch::Tensor MoCERouterImpl::assignment_scores(const torch::Tensor& x, const RoutingPlan& plan) {
  // Softmax inside the token's group, 0 for other groups' experts (a token may only use its group);
  // general experts, if any, get their own router's softmax.
  torch::NoGradGuard ng;
  const auto tok_cluster = token_clusters(plan);
  TORCH_CHECK(tok_cluster.defined(), "moce: the plan carries no token clusters");
  const int64_t T = x.size(0), E = n_expert_, Eg = n_per_group_, G = n_cluster_;
  auto s = torch::zeros({T, E}, x.options());
  for (int64_t g = 0; g < G; ++g) {
    auto rows = (tok_cluster == g).nonzero().squeeze(1).to(x.device());  // [n_g]
    if (rows.numel() == 0) continue;
    auto p = torch::softmax(torch::matmul(x.index_select(0, rows), group_weight[g].t()), 1);  // [n_g, Eg]
    s.narrow(1, group_expert(g, 0), Eg).index_copy_(0, rows, p);
  }
  if (n_general_ > 0)
    s.narrow(1, E - n_general_, n_general_).copy_(torch::softmax(torch::matmul(x, general_weight.t()), 1));
  return s;
}

nlohmann::json MoCERouterImpl::describe_state() const {
  auto j = Router::describe_state();
  auto vec = [](const torch::Tensor& t) {
    auto c = t.to(torch::kCPU, torch::kDouble).contiguous();
    return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
  };
  j["pool"] = to_string(cfg_.moce.pool);
  j["centroid_sequences"] = vec(centroid_count);
  j["cluster_bias"] = vec(cluster_bias);
  j["expert_count"] = vec(expert_count);
  return j;
}

void MoCERouterImpl::reset_counters() {
  torch::NoGradGuard ng;
  expert_count.zero_();
}

torch::Tensor MoCERouterImpl::token_clusters(const RoutingPlan& plan) const {
  const auto* carry = dynamic_cast<const MoceCarry*>(plan.carry.get());
  return carry ? carry->token_cluster : torch::Tensor();
}

nlohmann::json MoCERouterImpl::trace_fields(const RoutingPlan& plan, int64_t token,
                                            const std::vector<int64_t>& /*experts*/) const {
  // The token's cluster (stage 1; later MoE layers keep the first one's), docs/serve.md, "Traces".
  const auto c = token_clusters(plan);
  if (!c.defined()) return nlohmann::json::object();
  return {{"cluster", c[token].item<int64_t>()}};
}

std::optional<Router::OfflineClustering> MoCERouterImpl::offline_clustering() const {
  if (cfg_.moce.clustering == SeqClustering::kOnline) return std::nullopt;
  OfflineClustering c;
  c.method = to_string(cfg_.moce.clustering);
  c.key = "moe.moce_clustering";
  c.n_cluster = n_cluster_;
  c.prompt_only = cfg_.moce.pool == MocePool::kPrompt;
  return c;
}

torch::Tensor MoCERouterImpl::sequence_representation(const RoutingPlan& plan) const {
  return plan.sequence_rows.empty() ? torch::Tensor() : plan.sequence_rows.front();
}

std::string to_string(MocePool v) {
  return v == MocePool::kPrefix ? "prefix" : v == MocePool::kPrompt ? "prompt" : "sequence";
}

std::string to_string(MoceAssign v) {
  return v == MoceAssign::kGate ? "gate" : "centroid";
}

std::string to_string(SeqClustering v) {
  return v == SeqClustering::kOnline ? "online" : v == SeqClustering::kHidden ? "hidden" : "tfidf";
}

RouterSpec moce_router_spec() {
  using option_checks::str;
  RouterSpec r;
  r.name = "moce";
  r.summary =
      "MoCE dual-stage routing: sequence clusters, then top-K in the cluster's group (Eo et al. 2025; "
      "section 6)";
  r.make = [](const MoEConfig& cfg, int64_t d_model) {
    return std::make_shared<MoCERouterImpl>(cfg, d_model);
  };
  r.bind = [](ConfigBinder& b, MoEConfig* c) {
    auto& o = c->moce;
    b.bind("moe.moce_n_general", &o.n_general);
    b.bind("moe.moce_general_used", &o.general_used);
    b.bind("moe.centroid_decay", &o.centroid_decay);
    b.bind_enum(
        "moe.moce_pool", &o.pool,
        {{"prefix", MocePool::kPrefix}, {"sequence", MocePool::kSequence}, {"prompt", MocePool::kPrompt}});
    b.bind("moe.moce_balance_rate", &o.balance_rate);
    b.bind_enum("moe.moce_assign", &o.assign,
                {{"centroid", MoceAssign::kCentroid}, {"gate", MoceAssign::kGate}});
    b.bind("moe.moce_cluster_per_layer", &o.cluster_per_layer);
    b.bind_enum("moe.moce_clustering", &o.clustering,
                {{"online", SeqClustering::kOnline},
                 {"hidden", SeqClustering::kHidden},
                 {"tfidf", SeqClustering::kTfidf}});
  };
  r.validate = [](const MoEConfig& c) {
    const auto& o = c.moce;
    option_checks::clusters(c);
    const int64_t E = c.routed_experts(), K = c.routed_used();
    if (o.n_general < 0 || o.n_general >= E)
      throw ConfigError("moe.moce_n_general", "must be in [0, " + str(E) + "), got " + str(o.n_general));
    const int64_t grouped = E - o.n_general;
    if (grouped % c.n_cluster != 0)
      throw ConfigError("moe.n_cluster", "the " + str(grouped) + " cluster experts do not split into " +
                                             str(c.n_cluster) + " equal groups");
    if (K > grouped / c.n_cluster)
      throw ConfigError("moe.n_expert_used", "K = " + str(K) + " exceeds the " + str(grouped / c.n_cluster) +
                                                 " experts of one cluster group");
    if (o.n_general > 0 && (o.general_used < 1 || o.general_used > o.n_general))
      throw ConfigError("moe.moce_general_used", "must be in [1, moe.moce_n_general = " + str(o.n_general) +
                                                     "], got " + str(o.general_used));
    option_checks::unit_decay("moe.centroid_decay", o.centroid_decay);
    option_checks::nonneg("moe.moce_balance_rate", o.balance_rate);
    if (o.assign == MoceAssign::kGate && o.clustering != SeqClustering::kOnline)
      throw ConfigError("moe.moce_clustering",
                        "\"" + to_string(o.clustering) +
                            "\" sets centroids, which moe.moce_assign = \"gate\" does not use");
  };
  r.validate_unpicked = [](const MoEConfig& c) {
    // Offline sequence clustering only means something to a router that routes by sequence cluster.
    if (c.moce.assign != MoceAssign::kCentroid || c.moce.cluster_per_layer)
      throw ConfigError(
          c.moce.assign != MoceAssign::kCentroid ? "moe.moce_assign" : "moe.moce_cluster_per_layer",
          "is an option of MoCE's sequence clusters and needs moe.router = \"moce\", got \"" + c.router +
              "\"");
    if (c.moce.clustering != SeqClustering::kOnline)
      throw ConfigError("moe.moce_clustering",
                        "\"" + to_string(c.moce.clustering) +
                            "\" needs moe.router = \"moce\" (only MoCE routes by sequence cluster), got \"" +
                            c.router + "\"");
  };
  r.late_buffers = {"cluster_bias"};  // the cluster balance bias came after the first MoCE checkpoints
  r.prompt_rows = [](const MoEConfig& c) -> std::pair<std::string, std::string> {
    if (c.moce.pool != MocePool::kPrompt) return {};
    return {"moe.moce_pool", "\"prompt\" pools each sequence's prompt"};
  };
  r.equal_compute = [](MoEConfig& m) {
    // General experts add moce_general_used assignments to every token: take them out of the group's K.
    const int64_t K = m.n_expert_used, general = m.moce.n_general > 0 ? m.moce.general_used : 0;
    if (K - general < 1)
      throw ConfigError("moe.moce_general_used",
                        "leaves no group expert within K = " + str(K) + " (moce at equal compute)");
    m.n_expert_used = K - general;
    return "top-" + str(K - general) + " in group" +
           (general ? " + " + str(general) + " general" : std::string());
  };
  return r;
}

}  // namespace moeforge
