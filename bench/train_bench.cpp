#include "train_bench.h"

#include <torch/torch.h>

#include <iomanip>
#include <map>

#include "moeforge/data/batching.h"
#include "moeforge/model/transformer.h"
#include "moeforge/train/optim.h"
#include "moeforge/train/run_config.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/progress.h"
#include "moeforge/util/runtime.h"
#include "timing.h"

namespace moeforge {
namespace {

// One model with its optimiser, trained on the batches it is handed exactly as train_model does a step
// (forward, cross-entropy + aux loss, backward, clipping, AdamW, router after_step, zero_grad).
struct Trainee {
  RunConfig cfg;
  TransformerLM model{nullptr};
  std::vector<torch::Tensor> params;
  std::unique_ptr<AdamW> optim;
  int64_t step = 0;

  Trainee(RunConfig c, int64_t vocab) : cfg(std::move(c)) {
    torch::manual_seed(uint64_t(cfg.train.seed));
    model = build_model(cfg, vocab);
    model->train();
    std::vector<std::pair<std::string, torch::Tensor>> named;
    for (auto& p : model->named_parameters()) {
      if (!p.value().requires_grad()) continue;
      named.push_back({p.key(), p.value()});
      params.push_back(p.value());
    }
    optim = std::make_unique<AdamW>(named, cfg.train);
  }

  void train_step(const Batcher::Batch& batch) {
    auto [ce, out] = training_forward(model, batch);
    (ce.mean() + out.aux_loss).backward();
    clip_grad_norm(params, cfg.train.grad_clip);
    optim->step(learning_rate(cfg.train, step));
    model->add_token_loss(ce.detach());
    model->after_step();
    optim->zero_grad();
    ++step;
  }
};

}  // namespace

nlohmann::json run_train_bench(const TrainBenchOptions& opt, std::ostream& log) {
  RunConfig cfg = load_run_config(opt.config, opt.overrides);
  const int threads = init_threads(int(cfg.train.threads));
  DataBundle data = prepare_data(cfg.data, nullptr, log);
  const int64_t vocab = data.tokenizer->vocab_size();

  RunConfig fused_cfg = cfg, plain_cfg = cfg;
  fused_cfg.moe.experts_impl = ExpertsImplKind::kGrouped;
  plain_cfg.moe.experts_impl = ExpertsImplKind::kReference;
  Trainee fused(fused_cfg, vocab), plain(plain_cfg, vocab);
  const auto counts = count_model(*fused.model);
  // Training FLOPs per token: forward matmuls (count_model: 2 x active matmul parameters + attention at
  // the full sequence length) and twice that for backward (gradients of activations and of weights).
  const double train_flops_per_token = 3.0 * counts.flops_per_token;

  // The same batches, in the same order, for both models.
  const int warmup = 2;
  Batcher batcher(data.train, cfg.train.batch_size, uint64_t(cfg.train.seed), /*shuffle=*/true);
  std::vector<Batcher::Batch> batches;
  for (int i = 0; i < warmup + opt.steps; ++i) batches.push_back(batcher.next());
  const int64_t tokens_per_step = batches.front().tokens.size(0) * cfg.data.seq_len;

  // The machine's sgemm rate, in the same run: a square float32 product as large as BLAS likes.
  const int64_t n = 2048;
  auto a = torch::randn({n, n}), b = torch::randn({n, n}), c = torch::empty({n, n});
  const double sgemm_flops = 2.0 * double(n) * double(n) * double(n);

  size_t next_fused = 0, next_plain = 0;
  ProgressBar bar("bench train", warmup + opt.steps, log, true);
  bench::Variants variants = {
      {"fused", [&] { fused.train_step(batches[next_fused++ % batches.size()]); }},
      {"plain",
       [&] {
         plain.train_step(batches[next_plain++ % batches.size()]);
         bar.update(int64_t(next_plain));
       }},
      {"sgemm", [&] { at::mm_out(c, a, b); }},
  };
  auto t = bench::interleaved(variants, opt.steps, warmup);
  bar.finish();

  const double sgemm_gflops = sgemm_flops / (t["sgemm"].median() * 1e-3) * 1e-9;
  nlohmann::json variants_json;
  log << "\nend-to-end training, " << tokens_per_step << " tokens per step, " << std::fixed
      << std::setprecision(2) << train_flops_per_token * 1e-6 << " MFLOP per token (3 x forward matmuls), "
      << threads << " threads\n";
  log << std::left << std::setw(8) << "variant" << std::right << std::setw(12) << "step_ms" << std::setw(12)
      << "tokens/s" << std::setw(10) << "GFLOP/s" << std::setw(16) << "share_of_sgemm\n";
  for (const std::string name : {"fused", "plain"}) {
    const double ms = t[name].median();
    const double tok_s = double(tokens_per_step) / (ms * 1e-3);
    const double gflops = tok_s * train_flops_per_token * 1e-9;
    variants_json[name] = {{"step_ms", ms},
                           {"step_ms_range", {t[name].min(), t[name].max()}},
                           {"tokens_per_s", tok_s},
                           {"gflops", gflops},
                           {"share_of_sgemm", gflops / sgemm_gflops},
                           {"experts_impl", name == "fused" ? "grouped" : "reference"}};
    log << std::left << std::setw(8) << name << std::right << std::setprecision(1) << std::setw(12) << ms
        << std::setprecision(0) << std::setw(12) << tok_s << std::setprecision(1) << std::setw(10) << gflops
        << std::setprecision(3) << std::setw(15) << gflops / sgemm_gflops << "\n";
  }
  const double speedup = t["plain"].median() / t["fused"].median();
  log << "sgemm " << n << "^3: " << std::setprecision(1) << sgemm_gflops << " GFLOP/s; fused vs plain "
      << std::setprecision(3) << speedup << "x" << std::endl;
  return {{"machine", describe_machine()},
          {"config", opt.config.empty() ? "configs/default.toml (embedded)" : opt.config},
          {"overrides", opt.overrides},
          {"steps", opt.steps},
          {"tokens_per_step", tokens_per_step},
          {"forward_flops_per_token", counts.flops_per_token},
          {"train_flops_per_token", train_flops_per_token},
          {"sgemm_n", n},
          {"sgemm_gflops", sgemm_gflops},
          {"sgemm_ms_range", {t["sgemm"].min(), t["sgemm"].max()}},
          {"variants", variants_json},
          {"speedup", speedup}};
}

}  // namespace moeforge
