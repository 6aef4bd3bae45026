// Loading and building a model (load.h).
#include "moeforge/model/load.h"

#include <algorithm>

#include "moeforge/model/checkpoint.h"
#include "moeforge/util/error.h"

namespace moeforge {

TransformerLM build_model(RunConfig& cfg, int64_t vocab_size) {
  cfg.model.vocab_size = vocab_size;
  cfg.model.max_seq_len = cfg.data.seq_len;
  return TransformerLM(cfg.model, cfg.moe);
}

void check_config_fits_model_file(const RunConfig& cfg, int64_t vocab_size, const NamedTensors& model,
                                  const std::string& where) {
  // In doubles: a hostile config's products may overflow int64; the bound only needs to be compared.
  const auto& m = cfg.model;
  const auto& moe = cfg.moe;
  const double C = double(m.d_model), V = double(vocab_size);
  double bound = V * C * (m.tie_embeddings ? 1.0 : 2.0);  // embedding (and an untied head)
  for (int64_t i = 0; i < m.n_layer; ++i) {
    bound += 4.0 * C * C;  // attention: w_qkv [3C, C] and w_out [C, C]
    if (!m.is_moe_layer(i))
      bound += 3.0 * C * double(m.d_ff);  // dense SwiGLU
    else if (moe.expert_form == ExpertForm::kAdapter)
      bound += 3.0 * C * double(moe.d_expert);  // the frozen FFN the adapters sit on
    else
      bound += 3.0 * C * double(moe.n_expert) * double(moe.d_expert);  // E experts of width F (split or not)
    if (bound > 1e18) break;                                           // already beyond any file
  }
  double held = 0;
  for (const auto& [name, t] : model) held += double(t.numel());
  if (bound > held)
    throw FileError(where, "config.toml describes a model of at least " +
                               std::to_string(int64_t(std::min(bound, 9e18))) +
                               " parameters, the model file holds " + std::to_string(int64_t(held)) +
                               " (mismatched or hostile checkpoint)");
}

LoadedModel load_model(const std::string& checkpoint_dir) {
  LoadedModel lm;
  lm.dir = resolve_checkpoint_dir(checkpoint_dir);
  auto ckpt = load_checkpoint(lm.dir);
  lm.cfg = load_run_config_text(ckpt.config_toml, lm.dir + "/config.toml");
  try {
    lm.tokenizer = Tokenizer::from_serialized(ckpt.tokenizer_model);
  } catch (const std::exception& e) {
    throw FileError(lm.dir + "/tokenizer.model",
                    std::string("not a usable SentencePiece model: ") + e.what());
  }
  check_config_fits_model_file(lm.cfg, lm.tokenizer->vocab_size(), ckpt.model, lm.dir);
  lm.model = build_model(lm.cfg, lm.tokenizer->vocab_size());
  load_module_state(*lm.model, ckpt.model, lm.dir + "/model.safetensors");
  lm.model->eval();
  lm.step = ckpt.step;
  return lm;
}

}  // namespace moeforge
