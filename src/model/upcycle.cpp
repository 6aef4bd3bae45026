#include "moeforge/model/upcycle.h"

#include <sstream>

#include "moeforge/model/checkpoint.h"
#include "moeforge/model/load.h"
#include "moeforge/util/error.h"

namespace moeforge {

std::string upcycle(const UpcycleOptions& opt) {
  auto dense = load_model(opt.dense_checkpoint);
  RunConfig cfg = load_run_config_text(dense.cfg.to_toml(), dense.dir + "/config.toml", opt.overrides);
  if (cfg.model.moe_every <= 0)
    throw ConfigError("model.moe_every", "upcycling needs MoE layers: set it to >= 1");
  const bool adapter = cfg.moe.expert_form == ExpertForm::kAdapter;
  const int64_t width = adapter ? cfg.moe.d_expert : cfg.moe.routed_width();
  if (width != dense.cfg.model.d_ff)
    throw ConfigError("moe.d_expert", "an upcycled expert copies the dense FFN, so its width (" +
                                          std::to_string(width) + ") must equal model.d_ff (" +
                                          std::to_string(dense.cfg.model.d_ff) + ")");
  if (cfg.model.d_model != dense.cfg.model.d_model || cfg.model.n_layer != dense.cfg.model.n_layer ||
      cfg.model.n_head != dense.cfg.model.n_head)
    throw ConfigError("model", "upcycling keeps the dense model's d_model, n_layer and n_head");
  torch::manual_seed(opt.seed);
  TransformerLM moe = build_model(cfg, dense.tokenizer->vocab_size());
  std::map<std::string, torch::Tensor> src;
  for (auto& [name, t] : module_state(*dense.model)) src[name] = t;
  std::ostringstream report;
  int64_t copied = 0, upcycled = 0;
  torch::NoGradGuard ng;
  for (auto& [name, t] : module_state(*moe)) {
    auto it = src.find(name);
    if (it != src.end() && it->second.sizes() == t.sizes()) {
      t.copy_(it->second);
      ++copied;
      continue;
    }
    // FFN experts: blocks.<i>.moe.experts.<w> <- blocks.<i>.ffn.<w>, broadcast over experts (plus noise).
    // Adapter form (PESC adapters): blocks.<i>.moe.dense.<w> <- blocks.<i>.ffn.<w>, frozen; the adapters keep
    // their initialisation (W_up = 0), so the upcycled model starts as the dense one.
    for (const std::string part : {".moe.experts.", ".moe.dense."}) {
      const auto pos = name.find(part);
      if (pos == std::string::npos) continue;
      const std::string dense_name = name.substr(0, pos) + ".ffn." + name.substr(pos + part.size());
      auto d = src.find(dense_name);
      if (d == src.end())
        throw FileError(dense.dir, "no dense FFN weight '" + dense_name + "' to upcycle from");
      if (part == ".moe.dense.") {
        t.copy_(d->second);
      } else {
        auto copy = d->second.unsqueeze(0).expand_as(t).clone();
        if (opt.noise > 0) copy += torch::randn_like(copy) * (opt.noise * d->second.std().item<double>());
        t.copy_(copy);
      }
      ++upcycled;
    }
  }
  Checkpoint c;
  c.step = 0;
  c.config_toml = cfg.to_toml();
  c.tokenizer_model = dense.tokenizer->serialized();
  c.model = module_state(*moe);
  c.trainer_meta = {{"upcycled_from", dense.dir}};
  save_checkpoint(opt.out_dir, c);
  report << "upcycled " << dense.dir << " -> " << opt.out_dir << ": " << copied << " tensors copied, "
         << upcycled << " expert tensors initialised from dense FFNs (noise " << opt.noise
         << "), routers fresh";
  return report.str();
}

}  // namespace moeforge
