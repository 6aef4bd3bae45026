#include "train_bench.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <iomanip>
#include <map>
#include <memory>
#include <sstream>

#include "moeforge/config/run_config.h"
#include "moeforge/data/batching.h"
#include "moeforge/data/prepare.h"
#include "moeforge/model/load.h"
#include "moeforge/model/transformer.h"
#include "moeforge/train/optim.h"
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

  MatmulPrecision precision = MatmulPrecision::kFloat32;  // cfg.train.precision, checked against the CPU

  Trainee(RunConfig c, int64_t vocab) : cfg(std::move(c)) {
    precision = run_precision(cfg.train, read_cpu_features());
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
    MatmulPrecisionGuard guard(precision);
    auto fwd = training_forward(model, batch);
    (fwd.loss() + fwd.out.aux_loss).backward();
    clip_grad_norm(params, cfg.train.grad_clip);
    optim->step(learning_rate(cfg.train, step));
    model->add_token_loss(fwd.token_ce.detach());
    model->after_step();
    optim->zero_grad();
    ++step;
  }
};

// What the profiling callbacks collect on the thread that runs the step (forward and, on CPU, backward).
struct StepRecord {
  struct Scope {
    std::string name;
    double ms;
    uint64_t seq_begin, seq_end;  // autograd nodes created inside: [seq_begin, seq_end)
  };
  struct Node {
    int64_t seq;
    double ms;
  };
  std::vector<Scope> scopes;
  std::vector<Node> nodes;
};
StepRecord* g_record = nullptr;  // set only while a profiled step runs

struct ScopeStart : at::ObserverContext {
  std::chrono::steady_clock::time_point t0;
  uint64_t seq0 = 0;
};

std::unique_ptr<at::ObserverContext> on_scope_start(const at::RecordFunction& fn) {
  if (g_record == nullptr) return nullptr;
  if (fn.scope() == at::RecordScope::USER_SCOPE && std::string(fn.name()).rfind("moeforge::", 0) != 0)
    return nullptr;
  auto ctx = std::make_unique<ScopeStart>();
  ctx->seq0 = at::sequence_number::peek();
  ctx->t0 = std::chrono::steady_clock::now();
  return ctx;
}

void on_scope_end(const at::RecordFunction& fn, at::ObserverContext* c) {
  if (g_record == nullptr || c == nullptr) return;
  const auto* ctx = static_cast<const ScopeStart*>(c);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - ctx->t0).count();
  if (fn.scope() == at::RecordScope::USER_SCOPE)
    g_record->scopes.push_back(
        {std::string(fn.name()).substr(10), ms, ctx->seq0, at::sequence_number::peek()});
  else
    g_record->nodes.push_back({fn.seqNr(), ms});
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// Each token's set of experts in a plan, as a sorted list per token.
std::vector<std::vector<int64_t>> experts_per_token(const RoutingPlan& plan, int64_t T) {
  std::vector<std::vector<int64_t>> sets(static_cast<size_t>(T));
  const auto off = plan.offsets();
  const auto idx = plan.token_index.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* pi = idx.data_ptr<int64_t>();
  for (size_t e = 0; e + 1 < off.size(); ++e)
    for (int64_t i = off[e]; i < off[e + 1]; ++i) sets[static_cast<size_t>(pi[i])].push_back(int64_t(e));
  for (auto& s : sets) std::sort(s.begin(), s.end());
  return sets;
}

// Where bf16 products could flip a routing decision (docs/performance.md, "bf16 training"): the router
// scores in float32, but its input, the residual stream, carries the bf16-rounded outputs of the layers
// before it. The same model and batch routed with float32 and with bf16 products (evaluation mode, no
// gradient): per MoE layer, the share of tokens whose set of experts differs.
nlohmann::json route_flips(TransformerLM& model, const Batcher::Batch& batch) {
  torch::NoGradGuard ng;
  const bool was_training = model->is_training();
  model->eval();
  const int64_t S = batch.tokens.size(1) - 1;
  const auto tokens = batch.tokens.narrow(1, 0, S);
  auto plans = [&](MatmulPrecision p) {
    MatmulPrecisionGuard guard(p);
    return model->forward(tokens, RouteContext{}).plans;
  };
  const auto p32 = plans(MatmulPrecision::kFloat32), p16 = plans(MatmulPrecision::kBFloat16);
  model->train(was_training);
  nlohmann::json layers = nlohmann::json::array();
  const int64_t T = tokens.numel();
  for (size_t l = 0; l < p32.size(); ++l) {
    const auto a = experts_per_token(p32[l], T), b = experts_per_token(p16[l], T);
    int64_t differ = 0;
    for (size_t t = 0; t < a.size(); ++t) differ += a[t] != b[t];
    layers.push_back(double(differ) / double(T));
  }
  return layers;
}

}  // namespace

nlohmann::json run_train_profile(const TrainBenchOptions& opt, std::ostream& log) {
  RunConfig cfg = load_run_config(opt.config, opt.overrides);
  const int threads = init_threads(int(cfg.train.threads));
  DataBundle data = prepare_data(cfg.data, nullptr, log);
  cfg.moe.experts_impl = ExpertsImplKind::kGrouped;
  Trainee t(cfg, data.tokenizer->vocab_size());
  Batcher batcher(data.train, cfg.train.batch_size, uint64_t(cfg.train.seed), /*shuffle=*/true);

  const std::vector<std::string> categories = {"data",          "embedding", "attention", "norm",
                                               "dense_ffn",     "routing",   "experts",   "output_projection",
                                               "cross_entropy", "other",     "optimiser"};
  std::map<std::string, double> fwd, bwd;  // category -> ms summed over the profiled steps
  double data_ms = 0, fwd_ms = 0, bwd_ms = 0, opt_ms = 0;
  std::vector<double> profiled_steps, plain_steps;

  // One step of Trainee::train_step, with the batch drawn inside and each phase timed.
  auto step = [&](bool profile) {
    StepRecord rec;
    g_record = profile ? &rec : nullptr;
    MatmulPrecisionGuard guard(t.precision);  // train.precision, as Trainee::train_step
    const auto t0 = std::chrono::steady_clock::now();
    const auto batch = batcher.next();
    const double d = ms_since(t0);
    const auto t1 = std::chrono::steady_clock::now();
    auto step_loss = training_forward(t.model, batch);
    auto& ce = step_loss.token_ce;
    auto& out = step_loss.out;
    auto loss = step_loss.loss() + out.aux_loss;
    const double f = ms_since(t1);
    const auto t2 = std::chrono::steady_clock::now();
    loss.backward();
    const double b = ms_since(t2);
    g_record = nullptr;
    const auto t3 = std::chrono::steady_clock::now();
    clip_grad_norm(t.params, cfg.train.grad_clip);
    t.optim->step(learning_rate(cfg.train, t.step));
    t.model->add_token_loss(ce.detach());
    t.model->after_step();
    t.optim->zero_grad();
    ++t.step;
    const double o = ms_since(t3);
    const double total = ms_since(t0);
    if (!profile) return total;
    data_ms += d;
    fwd_ms += f;
    bwd_ms += b;
    opt_ms += o;
    // Forward: each scope's wall time; backward: each node's, by the scope whose sequence range holds it.
    std::sort(rec.scopes.begin(), rec.scopes.end(),
              [](const auto& x, const auto& y) { return x.seq_begin < y.seq_begin; });
    double fwd_scoped = 0, bwd_nodes = 0;
    for (const auto& s : rec.scopes) {
      fwd[s.name] += s.ms;
      fwd_scoped += s.ms;
    }
    for (const auto& n : rec.nodes) {
      bwd_nodes += n.ms;
      std::string cat = "other";
      if (n.seq >= 0) {
        const uint64_t seq = uint64_t(n.seq);
        auto it = std::upper_bound(rec.scopes.begin(), rec.scopes.end(), seq,
                                   [](uint64_t v, const auto& s) { return v < s.seq_begin; });
        if (it != rec.scopes.begin() && seq < std::prev(it)->seq_end) cat = std::prev(it)->name;
      }
      bwd[cat] += n.ms;
    }
    fwd["other"] += f - fwd_scoped;
    bwd["other"] += b - bwd_nodes;
    return total;
  };

  auto handle = at::addThreadLocalCallback(
      at::RecordFunctionCallback(on_scope_start, on_scope_end)
          .scopes({at::RecordScope::USER_SCOPE, at::RecordScope::BACKWARD_FUNCTION}));
  for (int i = 0; i < 2; ++i) step(false);
  ProgressBar bar("bench profile", 2 * opt.steps, log, true);
  // Profiled and plain steps alternate, so that both see the same drift of the machine.
  for (int i = 0; i < opt.steps; ++i) {
    profiled_steps.push_back(step(true));
    plain_steps.push_back(step(false));
    bar.update(2 * (i + 1));
  }
  bar.finish();
  at::removeCallback(handle);

  const double n = double(opt.steps);
  const double profiled_ms = (data_ms + fwd_ms + bwd_ms + opt_ms) / n;
  double plain_mean = 0;
  for (double x : plain_steps) plain_mean += x / n;
  const int64_t tokens_per_step = cfg.train.batch_size * cfg.data.seq_len;
  log << "\ntraining step by category, fused experts, " << tokens_per_step << " tokens per step, " << threads
      << " threads, mean of " << opt.steps << " profiled steps (ms per step)\n";
  log << std::left << std::setw(20) << "category" << std::right << std::setw(10) << "forward" << std::setw(10)
      << "backward" << std::setw(10) << "total" << std::setw(8) << "share\n";
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& c : categories) {
    double f = fwd.count(c) ? fwd[c] / n : 0.0, b = bwd.count(c) ? bwd[c] / n : 0.0;
    if (c == "data") f = data_ms / n;
    if (c == "optimiser") f = opt_ms / n;
    const double total = f + b;
    rows.push_back({{"category", c},
                    {"forward_ms", f},
                    {"backward_ms", b},
                    {"total_ms", total},
                    {"share", total / profiled_ms}});
    log << std::left << std::setw(20) << c << std::right << std::fixed << std::setprecision(2)
        << std::setw(10) << f << std::setw(10) << b << std::setw(10) << total << std::setprecision(3)
        << std::setw(7) << total / profiled_ms << "\n";
  }
  log << std::left << std::setw(20) << "step" << std::right << std::setprecision(2) << std::setw(10)
      << fwd_ms / n << std::setw(10) << bwd_ms / n << std::setw(10) << profiled_ms << "\n"
      << "forward and backward columns of data and optimiser: the whole phase (clip, AdamW, router "
         "after_step, zero_grad); unprofiled steps in the same run: "
      << std::setprecision(2) << plain_mean << " ms (profiler cost " << std::setprecision(1)
      << 100.0 * (profiled_ms / plain_mean - 1.0) << "%)" << std::endl;
  return {{"machine", describe_machine()},
          {"config", opt.config.empty() ? "configs/default.toml (embedded)" : opt.config},
          {"overrides", opt.overrides},
          {"steps", opt.steps},
          {"tokens_per_step", tokens_per_step},
          {"step_ms_profiled", profiled_ms},
          {"step_ms_unprofiled", plain_mean},
          {"categories", rows}};
}

nlohmann::json run_train_bench(const TrainBenchOptions& opt, std::ostream& log) {
  RunConfig cfg = load_run_config(opt.config, opt.overrides);
  const int threads = init_threads(int(cfg.train.threads));
  DataBundle data = prepare_data(cfg.data, nullptr, log);
  const int64_t vocab = data.tokenizer->vocab_size();

  // fused and plain in float32 (whatever train.precision the config says), and fused again with bf16
  // products where the CPU has native bf16 (run_precision).
  const bool has_bf16 = !bf16_support(read_cpu_features()).empty();
  RunConfig fused_cfg = cfg, plain_cfg = cfg, bf16_cfg = cfg;
  fused_cfg.moe.experts_impl = bf16_cfg.moe.experts_impl = ExpertsImplKind::kGrouped;
  plain_cfg.moe.experts_impl = ExpertsImplKind::kReference;
  fused_cfg.train.precision = plain_cfg.train.precision = "fp32";
  bf16_cfg.train.precision = "bf16";
  Trainee fused(fused_cfg, vocab), plain(plain_cfg, vocab);
  std::unique_ptr<Trainee> bf16;
  if (has_bf16) bf16 = std::make_unique<Trainee>(bf16_cfg, vocab);
  const auto counts = count_model(*fused.model);
  // Training FLOPs per token: forward matmuls (count_model: 2 x active matmul parameters + attention at
  // the full sequence length) and twice that for backward (gradients of activations and of weights).
  const double train_flops_per_token = 3.0 * counts.flops_per_token;

  // The same batches, in the same order, for every model.
  const int warmup = 2;
  Batcher batcher(data.train, cfg.train.batch_size, uint64_t(cfg.train.seed), /*shuffle=*/true);
  std::vector<Batcher::Batch> batches;
  for (int i = 0; i < warmup + opt.steps; ++i) batches.push_back(batcher.next());
  const int64_t tokens_per_step = batches.front().tokens.size(0) * cfg.data.seq_len;

  // The machine's sgemm rate, in the same run: a square float32 product as large as BLAS likes; and the bf16
  // GEMM rate of LibTorch (oneDNN where the CPU has bf16 instructions), the ceiling of the bf16 step
  // (docs/performance.md, "bf16 on this CPU").
  const int64_t n = 2048;
  auto a = torch::randn({n, n}), b = torch::randn({n, n}), c = torch::empty({n, n});
  auto ab = a.to(torch::kBFloat16), bb = b.to(torch::kBFloat16), cb = torch::empty({n, n}, torch::kBFloat16);
  const double sgemm_flops = 2.0 * double(n) * double(n) * double(n);

  size_t next_fused = 0, next_plain = 0, next_bf16 = 0;
  ProgressBar bar("bench train", warmup + opt.steps, log, true);
  bench::Variants variants = {
      {"fused", [&] { fused.train_step(batches[next_fused++ % batches.size()]); }},
      {"plain",
       [&] {
         plain.train_step(batches[next_plain++ % batches.size()]);
         bar.update(int64_t(next_plain));
       }},
      {"sgemm", [&] { at::mm_out(c, a, b); }},
      {"bf16_gemm", [&] { at::mm_out(cb, ab, bb); }},
  };
  if (bf16) variants.push_back({"bf16", [&] { bf16->train_step(batches[next_bf16++ % batches.size()]); }});
  auto t = bench::interleaved(variants, opt.steps, warmup);
  bar.finish();

  const double sgemm_gflops = sgemm_flops / (t["sgemm"].median() * 1e-3) * 1e-9;
  const double bf16_gflops = sgemm_flops / (t["bf16_gemm"].median() * 1e-3) * 1e-9;
  nlohmann::json variants_json;
  log << "\nend-to-end training, " << tokens_per_step << " tokens per step, " << std::fixed
      << std::setprecision(2) << train_flops_per_token * 1e-6 << " MFLOP per token (3 x forward matmuls), "
      << threads << " threads\n";
  log << std::left << std::setw(8) << "variant" << std::right << std::setw(12) << "step_ms" << std::setw(12)
      << "tokens/s" << std::setw(10) << "GFLOP/s" << std::setw(10) << "share"
      << "  (of its own precision's GEMM rate)\n";
  std::vector<std::string> names = {"fused", "plain"};
  if (bf16) names.push_back("bf16");
  for (const auto& name : names) {
    const double ms = t[name].median();
    const double tok_s = double(tokens_per_step) / (ms * 1e-3);
    const double gflops = tok_s * train_flops_per_token * 1e-9;
    const bool is_bf16 = name == "bf16";
    const double share = gflops / (is_bf16 ? bf16_gflops : sgemm_gflops);
    variants_json[name] = {{"step_ms", ms},
                           {"step_ms_range", {t[name].min(), t[name].max()}},
                           {"tokens_per_s", tok_s},
                           {"gflops", gflops},
                           {"precision", is_bf16 ? "bf16" : "fp32"},
                           {"share_of_own_gemm", share},
                           {"share_of_sgemm", gflops / sgemm_gflops},
                           {"experts_impl", name == "plain" ? "reference" : "grouped"}};
    log << std::left << std::setw(8) << name << std::right << std::setprecision(1) << std::setw(12) << ms
        << std::setprecision(0) << std::setw(12) << tok_s << std::setprecision(1) << std::setw(10) << gflops
        << std::setprecision(3) << std::setw(10) << share << (is_bf16 ? "  of bf16 GEMM" : "  of sgemm")
        << "\n";
  }
  const double speedup = t["plain"].median() / t["fused"].median();
  // Routing flips of the fp32 model after its timed steps, on the first batch.
  const auto flips = route_flips(fused.model, batches.front());
  log << "tokens routed to another expert set with bf16 products, per MoE layer:";
  for (const auto& f : flips) log << " " << std::setprecision(4) << f.get<double>();
  log << "\n";
  const double bf16_speedup = bf16 ? t["fused"].median() / t["bf16"].median() : 0.0;
  log << "sgemm " << n << "^3: " << std::setprecision(1) << sgemm_gflops << " GFLOP/s; bf16 GEMM " << n
      << "^3: " << bf16_gflops << " GFLOP/s (" << std::setprecision(2) << bf16_gflops / sgemm_gflops
      << "x sgemm; cpu bf16: " << (has_bf16 ? bf16_support(read_cpu_features()) : "none")
      << "); fused vs plain " << std::setprecision(3) << speedup << "x";
  if (bf16) log << "; bf16 vs fused (fp32) " << bf16_speedup << "x";
  log << std::endl;
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
          {"bf16_gemm_gflops", bf16_gflops},
          {"bf16_gemm_ms_range", {t["bf16_gemm"].min(), t["bf16_gemm"].max()}},
          {"cpu_bf16", bf16_support(read_cpu_features())},
          {"variants", variants_json},
          {"speedup", speedup},
          {"route_flips_bf16", flips},
          {"bf16_speedup", bf16 ? nlohmann::json(bf16_speedup) : nlohmann::json(nullptr)}};
}

nlohmann::json run_variant_throughput(const std::vector<CompareVariant>& variants, int steps,
                                      std::ostream& log) {
  if (variants.empty()) return nullptr;
  const RunConfig& first = variants.front().cfg;
  std::ostringstream quiet;
  DataBundle data = prepare_data(first.data, nullptr, quiet);
  const int64_t vocab = data.tokenizer->vocab_size();
  const int warmup = 2;
  Batcher batcher(data.train, first.train.batch_size, uint64_t(first.train.seed), /*shuffle=*/true);
  std::vector<Batcher::Batch> batches;
  for (int i = 0; i < warmup + steps; ++i) batches.push_back(batcher.next());
  const int64_t tokens_per_step = batches.front().tokens.size(0) * first.data.seq_len;
  std::vector<std::unique_ptr<Trainee>> models;
  std::vector<size_t> next(variants.size(), 0);
  bench::Variants timed;
  ProgressBar bar("bench variants", int64_t(variants.size()) * (warmup + steps), log, true);
  int64_t done = 0;
  for (size_t i = 0; i < variants.size(); ++i) {
    RunConfig cfg = variants[i].cfg;
    if (!variants[i].seeds.empty()) cfg.train.seed = variants[i].seeds.front();
    models.push_back(std::make_unique<Trainee>(cfg, vocab));
    timed.push_back({variants[i].name, [&, i] {
                       models[i]->train_step(batches[next[i]++ % batches.size()]);
                       bar.update(++done);
                     }});
  }
  auto t = bench::interleaved(timed, steps, warmup);
  bar.finish();
  nlohmann::json out = {{"machine", describe_machine()},
                        {"steps", steps},
                        {"tokens_per_step", tokens_per_step},
                        {"variants", nlohmann::json::object()}};
  const double base = t[variants.front().name].median();
  log << "\ntraining throughput, interleaved in one process, median of " << steps << " steps\n";
  for (auto& v : variants) {
    const double ms = t[v.name].median();
    out["variants"][v.name] = {{"step_ms", ms},
                               {"step_ms_range", {t[v.name].min(), t[v.name].max()}},
                               {"tokens_per_s", double(tokens_per_step) / (ms * 1e-3)},
                               {"ratio_to_first", ms / base}};
    log << "  " << std::left << std::setw(28) << v.name << std::right << std::fixed << std::setprecision(1)
        << std::setw(9) << ms << " ms/step " << std::setprecision(0) << std::setw(8)
        << double(tokens_per_step) / (ms * 1e-3) << " tokens/s  " << std::setprecision(3) << ms / base
        << " x " << variants.front().name << "\n";
  }
  return out;
}

}  // namespace moeforge
