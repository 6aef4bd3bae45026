// Helpers several subcommands share (cli_util.h).
#include "cli_util.h"

#include <cmath>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "bench/timing.h"
#include "moeforge/model/inference_precision.h"

namespace moeforge::cli {

std::vector<std::string> split_csv(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t end = s.find(',', start);
    const std::string item = s.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!item.empty()) out.push_back(item);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

std::string fixed(double v, int p) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(p) << v;
  return os.str();
}

void apply_dtype(LoadedModel& lm, const std::string& dtype) {
  std::string line;
  const auto p = inference_precision(dtype, lm.cfg.train.precision, read_cpu_features(), "--dtype", &line);
  if (p == MatmulPrecision::kBFloat16) {
    const auto s = store_weights_bf16(*lm.model);
    line += ": " + std::to_string(s.bf16_params) + " parameters in bf16, " + std::to_string(s.fp32_params) +
            " in float32, " + fixed(double(s.bytes()) / (1 << 20), 1) + " MiB";
  }
  std::cerr << "moeforge: " << line << "\n";
}

void add_dtype_option(CLI::App* c, std::string& dtype) {
  c->add_option("--dtype", dtype,
                "weights: fp32, bf16 (matrix weights stored in bf16, on CPUs with bf16 products) or auto "
                "(the checkpoint's train.precision); default fp32 (docs/performance.md, \"bf16 inference\")");
}

std::string sample_text(LoadedModel& lm, const std::string& prompt, const GenerateOptions& g, bool ignore_eos,
                        bool timing, GenerateStop* why, const GenerateHooks& hooks) {
  auto ids = lm.tokenizer->encode(prompt);
  ids.insert(ids.begin(), lm.tokenizer->bos_id());
  auto opt = g;
  opt.eos_id = ignore_eos ? -1 : lm.tokenizer->eos_id();
  if (timing) {
    // Decode speed inside one process (docs/interop.md, "Decode speed"): the same prompt with 1 new token
    // (prefill and the first token), then with all of them; the difference is the decode of the rest.
    auto one = opt;
    one.max_tokens = 1;
    const double t1 = bench::time_ms([&] { generate(lm.model, ids, one); });
    std::vector<int64_t> out;
    const double tn = bench::time_ms([&] { out = generate(lm.model, ids, opt); });
    const int64_t n = int64_t(out.size()) - 1;
    std::cerr << "timing: prompt " << ids.size() << " tokens, prefill + first token " << fixed(t1, 2)
              << " ms, decode of " << n << " more tokens " << fixed(tn - t1, 2)
              << " ms = " << fixed(n > 0 ? n / ((tn - t1) * 1e-3) : 0.0, 1) << " tokens/s\n";
  }
  auto out = generate(lm.model, ids, opt, why, hooks);
  if (!out.empty() && out.back() == opt.eos_id) out.pop_back();
  // The continuation as decoded after the prompt's tokens: what decoding them together adds to the
  // prompt's own decoding (a leading space only where the model began a new word).
  const std::string before = lm.tokenizer->decode(ids);
  auto all = ids;
  all.insert(all.end(), out.begin(), out.end());
  const std::string whole = lm.tokenizer->decode(all);
  if (whole.compare(0, before.size(), before) == 0) return prompt + whole.substr(before.size());
  return prompt + lm.tokenizer->decode(out);
}

void print_cluster_table(const EvalResult& r) {
  if (r.cluster_domain.empty()) return;
  std::cout << "clusters x domains (sequences; nearest-centroid assignment), purity "
            << fixed(r.cluster_purity, 3) << ":\n  cluster";
  for (auto& d : r.domains) std::cout << " " << std::setw(std::max<int>(6, int(d.size()))) << d;
  std::cout << "\n";
  for (size_t c = 0; c < r.cluster_domain.size(); ++c) {
    std::cout << "  " << std::setw(7) << c;
    for (size_t d = 0; d < r.domains.size(); ++d)
      std::cout << " " << std::setw(std::max<int>(6, int(r.domains[d].size()))) << r.cluster_domain[c][d];
    std::cout << "\n";
  }
}

void print_router_state(const Router& router, size_t layer) {
  std::cout << "    router state (layer " << layer << "):\n";
  const nlohmann::json state = router.describe_state();  // kept alive: items() refers into it
  for (auto& [key, value] : state.items()) {
    std::string text = value.dump();
    if (text.size() > 2000) text = text.substr(0, 2000) + " ...";
    std::cout << "      " << key << ": " << text << "\n";
  }
}

void print_eval(const EvalResult& r) {
  std::cout << r.split << ": loss " << fixed(r.loss, 4) << ", perplexity " << fixed(r.perplexity, 2)
            << " over " << r.tokens << " tokens; MaxVio_global " << fixed(r.max_vio_global, 3)
            << ", specialisation " << fixed(r.specialization, 3) << "\n";
  for (size_t l = 0; l < r.layers.size(); ++l)
    std::cout << "  MoE layer " << l << ": MaxVio_global " << fixed(r.layers[l].max_vio_global, 3)
              << ", specialisation " << fixed(r.layers[l].specialization, 3) << "\n";
  if (r.has_ec)
    std::cout << "expert choice: batch-routed loss " << fixed(r.ec_batch_loss, 4) << " (ppl "
              << fixed(std::exp(r.ec_batch_loss), 2) << "), threshold-routed loss "
              << fixed(r.ec_threshold_loss, 4) << " (ppl " << fixed(std::exp(r.ec_threshold_loss), 2)
              << "), gap " << fixed(r.ec_gap(), 4) << " (generation can only use threshold routing)\n";
  print_cluster_table(r);
}

}  // namespace moeforge::cli
