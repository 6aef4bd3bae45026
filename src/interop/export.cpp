#include "moeforge/interop/export.h"

#include "moeforge/interop/gguf.h"
#include "moeforge/interop/hf.h"
#include "moeforge/interop/mixtral.h"
#include "moeforge/model/load.h"
#include "moeforge/util/error.h"

namespace moeforge {

void export_checkpoint(const ExportOptions& opt, std::ostream& log) {
  if (opt.format != "gguf" && opt.format != "hf")
    throw ConfigError("--format", "unknown format '" + opt.format + "' (expected gguf or hf)");
  const bool gguf = opt.format == "gguf";
  const bool known =
      opt.dtype == "f32" || opt.dtype == "f16" || opt.dtype == "bf16" || (gguf && opt.dtype == "q8_0");
  if (!known)
    throw ConfigError("--dtype", "'" + opt.dtype + "' is not one the " + opt.format +
                                     " writer has (f32, f16, bf16" + (gguf ? ", q8_0)" : ")"));
  auto lm = load_model(opt.checkpoint);
  auto m = to_mixtral(lm, opt.format);
  if (gguf) {
    GgufExportOptions g;
    g.dtype = opt.dtype == "f16"    ? GgufDType::kF16
              : opt.dtype == "bf16" ? GgufDType::kBF16
              : opt.dtype == "q8_0" ? GgufDType::kQ8_0
                                    : GgufDType::kF32;
    g.notes = &m.notes;
    write_gguf(opt.out, m, g);
  } else {
    HfExportOptions h;
    h.dtype = opt.dtype;
    if (opt.max_shard_bytes > 0) h.max_shard_bytes = opt.max_shard_bytes;
    h.router_aux_loss_coef = lm.cfg.moe.balance_coef;
    write_hf(opt.out, m, h);
  }
  for (auto& n : m.notes) log << "  " << n << "\n";
  log << "wrote " << opt.out << " ("
      << (gguf ? "GGUF v3, " + std::string(m.form == "deepseek" ? "deepseek" : "llama") + " architecture"
               : std::string("Hugging Face MixtralForCausalLM"))
      << ", " << m.n_layer() << " layers, " << m.n_expert << " experts, top-" << m.n_expert_used << ", "
      << opt.dtype << ")\n";
}

}  // namespace moeforge
