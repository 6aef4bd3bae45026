// moeforge prune: experts under a validation load share removed from routing, with the perplexity change
// (docs/routing.md section 5).
#include <iostream>

#include "command.h"
#include "moeforge/experiments/prune.h"

namespace moeforge::cli {

Command add_prune(CLI::App& app, const Globals& /*g*/) {
  auto o = std::make_shared<PruneOptions>();
  auto* c = app.add_subcommand(
      "prune", "remove experts under a validation load share from routing; report the perplexity change");
  c->add_option("--checkpoint", o->checkpoint, "checkpoint folder")->required();
  c->add_option("--min-load", o->min_load, "prune experts whose load share is below this, in [0, 1)")
      ->required();
  c->add_option("--out", o->out_dir, "the pruned checkpoint folder")->required();
  c->add_option("--batches", o->eval_batches, "validation batches to measure (0 = the whole split)");
  return {c, [o] {
            prune_checkpoint(*o, std::cout);
            return 0;
          }};
}

}  // namespace moeforge::cli
