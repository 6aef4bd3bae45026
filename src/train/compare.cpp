// moeforge compare: the same run once per router, then the measures of docs/routing.md section 9 side by
// side.
//
// Legend: B sequences, S positions, T = B*S tokens, C model width, E routed experts, K assignments per token,
// G clusters, Eg experts per cluster.
#include "moeforge/train/compare.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <set>
#include <sstream>

#include "moeforge/routing/measures.h"
#include "moeforge/routing/registry.h"
#include "moeforge/train/report.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"
#include "moeforge/util/runtime.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

// An expert is counted dead when it gets under this share of the mean load over the validation set: an
// expert kept alive by a handful of stray tokens does no more work than one that gets none.
constexpr double kDeadShare = 0.01;
// Sequences of the evaluation batch the exact BIP optimum is solved on: GLPK's simplex on T*E columns
// stays at a few seconds for T = 8 * 128.
constexpr int64_t kGapSequences = 8;

std::string fmt(double v, int precision) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(precision) << v;
  return os.str();
}

std::string quote(const std::string& s) {
  return "'" + s + "'";
}

struct BatchMeasures {
  double gap = 0, capacity_violation = 0;  // optimality gap averaged over MoE layers; worst violation
  double leak_eval = 0, leak_train = 0;    // max causal leak over MoE layers, eval / training routing
  int64_t tokens = 0, k = 0, cap = 0;
};

// Optimality gap and causal leak of every MoE layer of `model` on the first `kGapSequences` sequences of
// `data`. The model is consumed: routing in training mode may move router state (MoCE's pending centroid
// sums), so the caller passes a copy restored from the checkpoint.
BatchMeasures measure_batch(TransformerLM& model, const PackedData& data, const RunConfig& cfg) {
  BatchMeasures r;
  torch::NoGradGuard ng;
  model->eval();
  const int64_t S = cfg.data.seq_len, B = std::min<int64_t>(kGapSequences, data.size());
  auto tokens = data.tokens.narrow(0, 0, B);  // [B, S+1]
  auto layers = model->moe_layers();
  for (auto& l : layers) l->set_record_input(true);
  RouteContext ctx;
  ctx.seq_domain = data.domain.narrow(0, 0, B);
  auto out = model->forward(tokens.narrow(1, 0, S), ctx);
  std::vector<torch::Tensor> inputs;
  for (auto& l : layers) {
    inputs.push_back(l->last_input());
    l->set_record_input(false);
  }

  const int64_t T = B * S, E = cfg.moe.routed_experts();
  r.tokens = T;
  r.k = cfg.moe.routed_used();
  r.cap = (T * r.k + E - 1) / E;  // capacity factor 1: the exactly balanced assignment
  for (size_t i = 0; i < layers.size(); ++i) {
    // Each router scores its own assignments (Router::assignment_scores: its probabilities, no bias).
    auto scores = layers[i]->router->assignment_scores(inputs[i], out.plans[i]);
    auto g = optimality_gap(scores, out.plans[i], r.k, r.cap);
    r.gap += g.gap / double(layers.size());
    r.capacity_violation = std::max(r.capacity_violation, g.capacity_violation);
  }
  // Causal leak (measures.h): several rows, cut points and replacements, the row's own future and the
  // other rows' futures; a fixed seed, so every router sees the same perturbations.
  const int64_t C = cfg.model.d_model;
  for (size_t i = 0; i < layers.size(); ++i) {
    auto x = inputs[i].reshape({B, S, C});
    layers[i]->eval();
    r.leak_eval = std::max(r.leak_eval, causal_leak(*layers[i], x).max());
    layers[i]->train();
    r.leak_train = std::max(r.leak_train, causal_leak(*layers[i], x).max());
    layers[i]->eval();
  }
  return r;
}

// (step, loss) of the metrics.jsonl lines of one split.
std::vector<std::pair<int64_t, double>> metric_curve(const fs::path& metrics, const std::string& split) {
  std::vector<std::pair<int64_t, double>> out;
  std::ifstream in(metrics);
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line);
    if (j.value("split", "") == split) out.push_back({j.value("step", int64_t{0}), j.value("loss", 0.0)});
  }
  return out;
}

// Trailing moving average over `window` values (shorter at the start): single steps are too noisy to
// tell routers apart by eye.
std::vector<double> smooth(const std::vector<double>& v, size_t window) {
  std::vector<double> out(v.size());
  double sum = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    sum += v[i];
    if (i >= window) sum -= v[i - window];
    out[i] = sum / double(std::min(i + 1, window));
  }
  return out;
}

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / double(v.size());
}

int dead_experts(const EvalResult& r) {
  int dead = 0;
  for (auto& l : r.layers) {
    double total = 0;
    for (auto x : l.load) total += double(x);
    const double mean = total / double(std::max<size_t>(l.load.size(), 1));
    for (auto x : l.load) dead += double(x) < kDeadShare * mean ? 1 : 0;
  }
  return dead;
}

nlohmann::json eval_json(const std::optional<EvalResult>& r) {
  if (!r) return nullptr;
  nlohmann::json layers = nlohmann::json::array();
  for (auto& l : r->layers)
    layers.push_back(
        {{"load", l.load}, {"max_vio_global", l.max_vio_global}, {"specialization", l.specialization}});
  return {{"loss", r->loss},
          {"perplexity", r->perplexity},
          {"tokens", r->tokens},
          {"max_vio_global", r->max_vio_global},
          {"specialization", r->specialization},
          {"layers", layers}};
}

void write_plots(const fs::path& dir, const nlohmann::json& result) {
  const fs::path plots = dir / "plots";
  fs::create_directories(plots);
  const auto& runs = result["runs"];
  std::ostringstream gp;
  gp << "set terminal pngcairo size 1000,800 font 'sans,10'\nset output "
     << quote((plots / "loss.png").string())
     << "\nset multiplot layout 2,1\nset grid\nset key top right\nset xlabel 'step'\n"
     << "set ylabel 'cross-entropy (nats)'\n";
  // Router names hold "_", which gnuplot's enhanced text would read as a subscript: labels are noenhanced.
  std::string train_plot, val_plot, vio_plot;
  for (size_t i = 0; i < runs.size(); ++i) {
    const std::string name = runs[i]["router"];
    const auto losses = runs[i]["train_loss"].get<std::vector<double>>();
    const auto vio = runs[i]["max_vio_batch_steps"].get<std::vector<double>>();
    const size_t window = std::max<size_t>(1, losses.size() / 30);
    const auto ls = smooth(losses, window), vs = smooth(vio, window);
    std::ostringstream tr, va;
    for (size_t s = 0; s < ls.size(); ++s) tr << s + 1 << " " << ls[s] << " " << vs[s] << "\n";
    for (auto& p : runs[i]["validation_curve"])
      va << p[0].get<int64_t>() << " " << p[1].get<double>() << "\n";
    const auto tf = plots / ("train_" + name + ".dat"), vf = plots / ("validation_" + name + ".dat");
    write_file_atomic(tf.string(), tr.str());
    write_file_atomic(vf.string(), va.str() + "\n");
    const std::string sep = i ? ", " : "";
    train_plot += sep + quote(tf.string()) + " using 1:2 with lines lw 2 lc " + std::to_string(i + 1) +
                  " title '" + name + "' noenhanced";
    val_plot += sep + quote(vf.string()) + " using 1:2 with linespoints lw 2 pt 7 lc " +
                std::to_string(i + 1) + " title '" + name + "' noenhanced";
    vio_plot += sep + quote(tf.string()) + " using 1:3 with lines lw 2 lc " + std::to_string(i + 1) +
                " title '" + name + "' noenhanced";
  }
  gp << "set title 'Training loss (moving average over "
     << std::max<size_t>(1, runs[0]["train_loss"].size() / 30) << " steps)'\nplot " << train_plot
     << "\nset title 'Validation loss'\nplot " << val_plot << "\nunset multiplot\n";
  gp << "set terminal pngcairo size 1000,500 font 'sans,10'\nset output "
     << quote((plots / "max_vio_batch.png").string())
     << "\nset title 'MaxVio_{batch} per training step (mean over MoE layers, moving average)'\n"
     << "set ylabel 'MaxVio_{batch}'\nset logscale y\nplot " << vio_plot << "\nunset logscale y\n";

  // Bar charts: one panel per measure, one bar per router.
  struct Bar {
    std::string file, title;
    std::function<double(const nlohmann::json&)> get;
  };
  auto ev = [](const char* split, const char* key) {
    return [=](const nlohmann::json& r) { return r[split].is_null() ? 0.0 : r[split][key].get<double>(); };
  };
  std::vector<Bar> bars = {
      {"ppl_validation", "validation perplexity", ev("validation", "perplexity")},
      {"ppl_heldout", "held-out genre perplexity", ev("heldout", "perplexity")},
      {"max_vio_batch", "MaxVio_{batch} (mean over steps)",
       [](const nlohmann::json& r) { return r["max_vio_batch_mean"].get<double>(); }},
      {"max_vio_global", "MaxVio_{global} (validation)", ev("validation", "max_vio_global")},
      {"specialization", "specialisation I(genre; expert)/H(genre)", ev("validation", "specialization")},
      {"gap", "optimality gap vs exact balanced optimum",
       [](const nlohmann::json& r) { return r["optimality_gap"]["gap"].get<double>(); }}};
  gp << "set terminal pngcairo size 1200,700 font 'sans,10'\nset output "
     << quote((plots / "bars.png").string())
     << "\nset multiplot layout 2,3\nunset key\nset style data histograms\nset style histogram clustered\n"
     << "set style fill solid 0.8 border -1\nset boxwidth 0.8\nset xtics rotate by -30 noenhanced\nset "
        "xlabel ''\n"
     << "set ylabel ''\n";
  for (auto& b : bars) {
    std::ostringstream dat;
    // An explicit range that always holds 0: a gap can be negative (a router that overfills capacity
    // collects more score than the balanced optimum), and gnuplot rejects all-zero or all-negative bars in
    // a [0:*] range.
    double lo = 0, hi = 0;
    for (auto& r : runs) {
      const double v = b.get(r);
      dat << r["router"].get<std::string>() << " " << v << "\n";
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    if (hi - lo <= 0) hi = 1;
    const double pad = 0.1 * (hi - lo);
    const auto f = plots / ("bar_" + b.file + ".dat");
    write_file_atomic(f.string(), dat.str());
    gp << "set title '" << b.title << "'\nset yrange [" << (lo < 0 ? lo - pad : 0.0) << ":" << hi + pad
       << "]\nplot " << quote(f.string()) << " using 2:xtic(1) lc 3\n";
  }
  gp << "unset multiplot\n";
  const auto script = plots / "compare.gp";
  write_file_atomic(script.string(), gp.str());
  const std::string cmd = "gnuplot " + quote(script.string()) + " 2>" + quote(script.string() + ".log");
  if (std::system(cmd.c_str()) != 0)
    throw FileError(script.string(),
                    "gnuplot failed (see " + script.string() + ".log; is gnuplot-nox installed?)");
}

std::string write_markdown(const fs::path& dir, const nlohmann::json& result, bool plots) {
  std::ostringstream md;
  md << "# Router comparison\n\n"
     << "Same data, seed, steps and model shape for every router, and the same active expert compute per "
        "token (K = "
     << result["k"].get<int64_t>() << " expert assignments per token on average).\n\n"
     << "| | |\n|---|---|\n"
     << "| command | `" << result["command"].get<std::string>() << "` |\n"
     << "| machine | " << result["machine"].get<std::string>() << " |\n"
     << "| steps x batch x sequence | " << result["steps"].get<int64_t>() << " x "
     << result["batch_size"].get<int64_t>() << " x " << result["seq_len"].get<int64_t>() << " |\n"
     << "| seed | " << result["seed"].get<int64_t>() << " |\n\n"
     << "## Results\n\n"
     << "| router | equal-compute setting | val ppl | held-out ppl | MaxVio_batch | MaxVio_global | "
        "specialisation | dead experts | opt. gap | cap. violation | causal leak (eval / train) | tokens/s "
        "|\n"
     << "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (auto& r : result["runs"]) {
    auto ppl = [&](const char* s) {
      return r[s].is_null() ? std::string("-") : fmt(r[s]["perplexity"].get<double>(), 2);
    };
    const auto& g = r["optimality_gap"];
    md << "| " << r.value("router_label", r["router"].get<std::string>()) << " | "
       << r["equal_compute"].get<std::string>() << " | " << ppl("validation") << " | " << ppl("heldout")
       << " | " << fmt(r["max_vio_batch_mean"].get<double>(), 3) << " | "
       << fmt(r["validation"]["max_vio_global"].get<double>(), 3) << " | "
       << fmt(r["validation"]["specialization"].get<double>(), 3) << " | " << r["dead_experts"].get<int>()
       << " | " << fmt(g["gap"].get<double>(), 4) << " | " << fmt(g["capacity_violation"].get<double>(), 3)
       << " | " << std::scientific << std::setprecision(1) << r["causal_leak"]["eval"].get<double>() << " / "
       << r["causal_leak"]["train"].get<double>() << std::defaultfloat << " | "
       << fmt(r["tokens_per_s"].get<double>(), 0) << " |\n";
  }
  md << "\nMaxVio_batch: (max load - mean load) / mean load per training batch, averaged over MoE layers and "
        "steps. MaxVio_global: the same over the summed validation loads. Specialisation: I(genre; expert) / "
        "H(genre) on the validation set. Dead experts: experts (summed over MoE layers) with under "
     << fmt(100 * kDeadShare, 0)
     << "% of the mean load on the validation set. Optimality gap: (sum s x_opt - sum s x_router) / sum s "
        "x_opt on "
     << result["gap_tokens"].get<int64_t>()
     << " validation tokens, x_opt the exact balanced optimum (capacity ceil(T K / E), GLPK), averaged over "
        "MoE "
        "layers; capacity violation: the worst max_e (load_e - cap) / cap. Causal leak: max |y' - y| of a "
        "MoE "
        "layer's output at positions <= S/2 of a sequence whose later positions were replaced, in evaluation "
        "and in training routing (0 = causal). Each run's own report is in <router>/report.md.\n\n";
  if (plots)
    md << "## Loss\n\n![loss](plots/loss.png)\n\n## Measures\n\n![bars](plots/bars.png)\n\n"
       << "## Balance during training\n\n![MaxVio_batch](plots/max_vio_batch.png)\n";
  const auto path = (dir / "compare.md").string();
  write_file_atomic(path, md.str());
  return path;
}

}  // namespace

std::vector<std::string> parse_router_list(const std::string& csv) {
  const auto known = router_names();
  std::string all;
  for (auto& r : known) all += (all.empty() ? "" : ",") + r;
  std::vector<std::string> out;
  std::set<std::string> seen;
  size_t start = 0;
  while (start <= csv.size()) {
    const size_t end = csv.find(',', start);
    const std::string item = csv.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!item.empty()) {
      if (std::find(known.begin(), known.end(), item) == known.end())
        throw ConfigError("--routers",
                          "unknown router '" + item + "' (expected a comma-separated subset of " + all + ")");
      if (!seen.insert(item).second) throw ConfigError("--routers", "router '" + item + "' is listed twice");
      out.push_back(item);
    }
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out.empty() ? known : out;
}

RunConfig equal_compute_config(const RunConfig& base, const std::string& router, std::string* how) {
  RunConfig cfg = base;
  cfg.moe.router = router;
  // The router's registry row knows how it matches top-K's assignments per token (routing/registry.h).
  const std::string desc = router_spec(router).equal_compute(cfg.moe);
  cfg.validate();
  if (how) *how = desc;
  return cfg;
}

std::string write_compare_outputs(const std::string& out_dir, const nlohmann::json& result, bool plots) {
  if (plots) write_plots(out_dir, result);
  return write_markdown(out_dir, result, plots);
}

nlohmann::json run_compare(const RunConfig& base, const CompareOptions& opt, std::ostream& log) {
  const auto routers = opt.routers.empty() ? router_names() : opt.routers;
  const fs::path dir(opt.out_dir);
  fs::create_directories(dir);
  nlohmann::json result = {{"command", opt.command},       {"machine", describe_machine()},
                           {"routers", routers},           {"k", base.moe.routed_used()},
                           {"steps", base.train.steps},    {"batch_size", base.train.batch_size},
                           {"seq_len", base.data.seq_len}, {"seed", base.train.seed},
                           {"config", base.to_toml()},     {"runs", nlohmann::json::array()}};
  for (size_t i = 0; i < routers.size(); ++i) {
    const std::string& router = routers[i];
    std::string how;
    RunConfig cfg = equal_compute_config(base, router, &how);
    log << "== compare " << i + 1 << "/" << routers.size() << ": " << router << " (" << how << ") ==\n";
    TrainOptions topt;
    topt.out_dir = (dir / router).string();
    topt.progress = opt.progress;
    topt.progress_label = router;
    fs::remove_all(topt.out_dir);  // a fresh run each time: metrics.jsonl must hold this run only
    TrainSummary s;
    BatchMeasures bm;
    ModelCounts counts;
    bool causal = true;
    std::string label = router;
    try {
      s = train_model(cfg, topt, log);
      auto lm = load_model(s.checkpoint);
      counts = count_model(*lm.model);
      // What the router says of its own setting (Router::causal, name): reports label non-causal runs.
      for (auto& l : lm.model->moe_layers()) {
        causal = causal && l->router->causal();
        label = l->router->name();
      }
      const std::string tok = lm.tokenizer->serialized();
      std::ostringstream quiet;
      DataBundle data = prepare_data(lm.cfg.data, &tok, quiet);
      bm = measure_batch(lm.model, data.validation, lm.cfg);
      if (opt.plots && s.validation) {
        ReportInputs rin;
        rin.run_dir = topt.out_dir;
        rin.title = "moeforge compare: " + router + " (" + how + ")";
        rin.facts = {{"steps", std::to_string(s.step)},
                     {"validation perplexity", fmt(s.validation->perplexity, 2)},
                     {"MaxVio_global (validation)", fmt(s.validation->max_vio_global, 3)},
                     {"specialisation", fmt(s.validation->specialization, 3)}};
        rin.validation = &*s.validation;
        write_report(rin);
      }
    } catch (const std::exception& e) {
      throw std::runtime_error("compare: router " + router + ": " + e.what());
    }
    if (!s.validation) throw std::runtime_error("compare: router " + router + ": no final validation");
    const auto metrics = dir / router / "metrics.jsonl";
    nlohmann::json run = {
        {"router", router},
        {"router_label", causal ? label : label + " [non-causal]"},
        {"causal", causal},
        {"equal_compute", how},
        {"moe",
         {{"n_expert_used", cfg.moe.n_expert_used},
          {"n_cluster_used", cfg.moe.n_cluster_used},
          {"ec_capacity_factor", cfg.moe.ec_capacity_factor}}},
        {"active_params_per_token", counts.active_params},
        {"mflop_per_token", counts.flops_per_token / 1e6},
        {"steps", s.step},
        {"seconds", s.seconds},
        {"tokens_per_s", s.tokens_per_s},
        {"first_batch", {{"tokens", s.first_batch_tokens}, {"digest", std::to_string(s.first_batch_digest)}}},
        {"train_loss", s.step_losses},
        {"max_vio_batch_steps", s.step_max_vio},
        {"max_vio_batch_mean", mean_of(s.step_max_vio)},
        {"validation", eval_json(s.validation)},
        {"heldout", eval_json(s.heldout)},
        {"validation_curve", metric_curve(metrics, "validation")},
        {"heldout_curve", metric_curve(metrics, "heldout")},
        {"dead_experts", dead_experts(*s.validation)},
        {"optimality_gap",
         {{"gap", bm.gap},
          {"capacity_violation", bm.capacity_violation},
          {"tokens", bm.tokens},
          {"k", bm.k},
          {"cap", bm.cap}}},
        {"causal_leak", {{"eval", bm.leak_eval}, {"train", bm.leak_train}}},
        {"checkpoint", s.checkpoint}};
    result["gap_tokens"] = bm.tokens;
    result["runs"].push_back(run);
    log << router << ": validation ppl " << fmt(s.validation->perplexity, 2) << ", MaxVio_batch "
        << fmt(mean_of(s.step_max_vio), 3) << ", MaxVio_global " << fmt(s.validation->max_vio_global, 3)
        << ", specialisation " << fmt(s.validation->specialization, 3) << ", optimality gap "
        << fmt(bm.gap, 4) << ", causal leak " << bm.leak_eval << " / " << bm.leak_train << ", "
        << fmt(s.tokens_per_s, 0) << " tokens/s\n";
    // Written after every run so that an interrupted comparison keeps what it finished.
    write_file_atomic((dir / "compare.json").string(), result.dump(1) + "\n");
  }
  log << "wrote " << write_compare_outputs(dir.string(), result, opt.plots) << "\n";
  return result;
}

}  // namespace moeforge
