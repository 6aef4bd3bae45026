// moeforge upcycle: an MoE checkpoint from a dense one (sparse upcycling; docs/training.md).
#include <iostream>

#include "command.h"
#include "moeforge/model/upcycle.h"

namespace moeforge::cli {

Command add_upcycle(CLI::App& app, const Globals& /*g*/) {
  auto o = std::make_shared<UpcycleOptions>();
  auto* c = app.add_subcommand("upcycle", "build an MoE checkpoint from a dense one (sparse upcycling)");
  c->add_option("--checkpoint", o->dense_checkpoint, "the dense checkpoint")->required();
  c->add_option("--set", o->overrides, "config overrides for the MoE model, e.g. model.moe_every=2");
  c->add_option("--out", o->out_dir, "the new checkpoint folder")->required();
  c->add_option("--noise", o->noise, "relative std of noise added to each expert copy")
      ->check(CLI::NonNegativeNumber);
  c->add_option("--seed", o->seed, "seed for the router initialisation and the noise");
  return {c, [o] {
            std::cout << upcycle(*o) << "\n";
            return 0;
          }};
}

}  // namespace moeforge::cli
