// moeforge inspect: a checkpoint's shapes and counts, and each MoE layer's utilisation and router state on
// validation data.
#include <iostream>

#include "cli_util.h"
#include "command.h"
#include "moeforge/data/prepare.h"

namespace moeforge::cli {

namespace {

void print_summary(const LoadedModel& lm) {
  auto c = count_model(*lm.model);
  const auto& m = lm.cfg.model;
  std::cout << "checkpoint " << lm.dir << " (step " << lm.step << ")\n"
            << "model: " << m.n_layer << " layers, d_model " << m.d_model << ", " << m.n_head
            << " heads, vocab " << m.vocab_size << ", context " << m.max_seq_len << ", MoE every "
            << m.moe_every << " layer(s)\n"
            << "moe: router " << lm.cfg.moe.router << ", " << lm.cfg.moe.routed_experts()
            << " experts of width " << lm.cfg.moe.routed_width() << ", top-" << lm.cfg.moe.routed_used()
            << ", " << lm.cfg.moe.n_shared_expert << " shared\n"
            << "parameters: " << c.total_params << " total, " << c.active_params << " active per token ("
            << c.embedding_params << " in the embedding); " << fixed(c.flops_per_token / 1e6, 2)
            << " MFLOP per token (forward)\n";
  std::cout << "\nshapes:\n";
  for (auto& p : lm.model->named_parameters())
    std::cout << "  " << p.key() << " " << p.value().sizes() << "\n";
  for (auto& b : lm.model->named_buffers())
    std::cout << "  " << b.key() << " " << b.value().sizes() << " (state)\n";
}

int run_inspect(const std::string& checkpoint) {
  auto lm = load_model(checkpoint);
  print_summary(lm);
  const std::string tok = lm.tokenizer->serialized();
  DataBundle data = prepare_data(lm.cfg.data, &tok, std::cout);
  auto r = evaluate(lm.model, data.validation, lm.cfg.train.batch_size, 8, "validation");
  std::cout << "\nutilisation on " << r.tokens << " validation tokens:\n";
  for (size_t l = 0; l < r.layers.size(); ++l) {
    const auto& L = r.layers[l];
    int64_t total = 0;
    for (auto x : L.load) total += x;
    std::cout << "  MoE layer " << l << " (MaxVio " << fixed(L.max_vio_global, 3) << "):";
    for (size_t e = 0; e < L.load.size(); ++e)
      std::cout << " e" << e << "="
                << fixed(100.0 * double(L.load[e]) / double(std::max<int64_t>(total, 1)), 1) << "%";
    std::cout << "\n";
    print_router_state(*lm.model->moe_layers().at(l)->router, l);
  }
  print_cluster_table(r);
  return 0;
}

}  // namespace

Command add_inspect(CLI::App& app, const Globals& /*g*/) {
  auto checkpoint = std::make_shared<std::string>();
  auto* c = app.add_subcommand("inspect", "model summary and per-layer / per-expert utilisation");
  c->add_option("--checkpoint", *checkpoint, "checkpoint folder")->required();
  return {c, [checkpoint] { return run_inspect(*checkpoint); }};
}

}  // namespace moeforge::cli
