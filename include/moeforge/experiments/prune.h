// Expert pruning for inference (docs/routing.md section 5): measure each expert's share of its MoE layer's
// load on the validation set, remove the experts under a threshold from routing (the routers' expert masks),
// and write a new checkpoint, reporting the validation perplexity before and after.
//
// Legend: L MoE layers, E experts per layer.
#pragma once

#include <ostream>
#include <string>
#include <vector>

namespace moeforge {

struct PruneOptions {
  std::string checkpoint;    // --checkpoint: a checkpoint folder (or a run's checkpoints/ folder)
  std::string out_dir;       // --out: the pruned checkpoint folder (written atomically)
  double min_load = 0;       // --min-load: experts whose load share is below this are pruned, in [0, 1)
  int64_t eval_batches = 0;  // --batches: validation batches measured (0 = the whole split)
};

struct PruneResult {
  std::vector<std::vector<double>> share;    // [L][E] load share of each expert before pruning
  std::vector<std::vector<int64_t>> pruned;  // [L] experts masked after pruning (ascending)
  double loss_before = 0, loss_after = 0, ppl_before = 0, ppl_after = 0;  // validation
  int64_t tokens = 0;
  std::string out_dir;
};

// Throws ConfigError naming the flag (--min-load, --out, --batches) for bad values or a threshold that
// would leave a layer with too few experts, FileError for an unreadable checkpoint.
PruneResult prune_checkpoint(const PruneOptions& opt, std::ostream& log);

// Experts whose share of `load` (measured on an evaluation set) is below `share_threshold`, ascending ids;
// the experts prune_checkpoint masks.
std::vector<int64_t> experts_below_load_share(const std::vector<double>& load, double share_threshold);

}  // namespace moeforge
