// Expert pruning, docs/routing.md section 5. See the header for the legend.
#include "moeforge/experiments/prune.h"

#include <cmath>
#include <filesystem>
#include <iomanip>
#include <sstream>
#include <stdexcept>

#include "moeforge/data/prepare.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/load.h"
#include "moeforge/train/evaluate.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/error.h"

namespace fs = std::filesystem;

namespace moeforge {

namespace {
std::string fixed(double v, int p) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(p) << v;
  return os.str();
}
}  // namespace

PruneResult prune_checkpoint(const PruneOptions& opt, std::ostream& log) {
  if (!std::isfinite(opt.min_load) || opt.min_load < 0 || opt.min_load >= 1)
    throw ConfigError("--min-load", "must be a load share in [0, 1), got " + std::to_string(opt.min_load));
  if (opt.out_dir.empty()) throw ConfigError("--out", "the pruned checkpoint folder is required");
  if (opt.eval_batches < 0)
    throw ConfigError("--batches", "must be >= 0, got " + std::to_string(opt.eval_batches));
  auto lm = load_model(opt.checkpoint);
  std::error_code ec;
  if (fs::exists(opt.out_dir) && fs::equivalent(opt.out_dir, lm.dir, ec))
    throw ConfigError("--out",
                      "'" + opt.out_dir + "' is the source checkpoint; write the pruned one elsewhere");
  auto layers = lm.model->moe_layers();
  if (layers.empty()) throw ConfigError("--checkpoint", "'" + lm.dir + "' has no MoE layer to prune");

  const std::string tok = lm.tokenizer->serialized();
  std::ostringstream data_log;
  DataBundle data = prepare_data(lm.cfg.data, &tok, data_log);
  const int64_t bs = lm.cfg.train.batch_size;
  auto before = evaluate(lm.model, data.validation, bs, opt.eval_batches, "validation");

  PruneResult r;
  r.loss_before = before.loss;
  r.ppl_before = before.perplexity;
  r.tokens = before.tokens;
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& load_i = before.layers.at(l).load;
    std::vector<double> load(load_i.begin(), load_i.end());
    double total = 0;
    for (double x : load) total += x;
    std::vector<double> share;
    for (double x : load) share.push_back(total > 0 ? x / total : 0.0);
    r.share.push_back(share);
    auto router = layers[l]->router;
    auto active = router->expert_mask();  // [E]; experts pruned before stay pruned (their share is 0)
    for (int64_t e : experts_below_load_share(load, opt.min_load)) active[e] = 0;
    try {
      router->set_expert_mask(active);
    } catch (const std::invalid_argument& e) {
      throw ConfigError("--min-load", fixed(opt.min_load, 4) + " prunes too much in MoE layer " +
                                          std::to_string(l) + ": " + e.what());
    }
    r.pruned.push_back(router->pruned_experts());
  }
  auto after = evaluate(lm.model, data.validation, bs, opt.eval_batches, "validation");
  r.loss_after = after.loss;
  r.ppl_after = after.perplexity;

  // The source checkpoint with the masked model; its optimiser state is dropped (an inference checkpoint).
  auto ckpt = load_checkpoint(lm.dir);
  ckpt.model = module_state(*lm.model);
  ckpt.optimizer.clear();
  ckpt.trainer_meta["pruned_from"] = lm.dir;
  ckpt.trainer_meta["prune_min_load"] = std::to_string(opt.min_load);
  ckpt.trainer_meta["prune_validation_ppl_before"] = std::to_string(r.ppl_before);
  ckpt.trainer_meta["prune_validation_ppl_after"] = std::to_string(r.ppl_after);
  save_checkpoint(opt.out_dir, ckpt);
  r.out_dir = opt.out_dir;

  for (size_t l = 0; l < r.share.size(); ++l) {
    log << "MoE layer " << l << " (" << layers[l]->router->name() << "): load share";
    for (size_t e = 0; e < r.share[l].size(); ++e)
      log << " e" << e << "=" << fixed(100 * r.share[l][e], 1) << "%";
    log << "; pruned " << r.pruned[l].size() << " of " << r.share[l].size() << ":";
    for (int64_t e : r.pruned[l]) log << " e" << e;
    log << "\n";
  }
  log << "validation perplexity over " << r.tokens << " tokens: " << fixed(r.ppl_before, 3) << " before, "
      << fixed(r.ppl_after, 3) << " after (" << (r.ppl_after >= r.ppl_before ? "+" : "")
      << fixed(100 * (r.ppl_after / r.ppl_before - 1), 2) << "%)\n"
      << "pruned checkpoint: " << r.out_dir << "\n";
  return r;
}

std::vector<int64_t> experts_below_load_share(const std::vector<double>& load, double share_threshold) {
  double total = 0;
  for (double l : load) total += l;
  std::vector<int64_t> out;
  for (size_t e = 0; e < load.size(); ++e)
    if ((total > 0 ? load[e] / total : 0.0) < share_threshold) out.push_back(int64_t(e));
  return out;
}

}  // namespace moeforge
