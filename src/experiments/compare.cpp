// moeforge compare: variants x seeds, each a normal training run, then the measures of docs/routing.md
// section 9 for every run (docs/comparison.md). This file plans and runs; compare_report.cpp aggregates and
// draws.
//
// Legend: B sequences, S positions, T = B*S tokens, C model width, E routed experts, K assignments per token.
#include "moeforge/experiments/compare.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <limits>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include "moeforge/config/binder.h"
#include "moeforge/config/toml_file.h"
#include "moeforge/data/prepare.h"
#include "moeforge/experiments/report.h"
#include "moeforge/model/load.h"
#include "moeforge/routing/measures.h"
#include "moeforge/routing/registry.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"
#include "moeforge/util/progress.h"
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

struct BatchMeasures {
  double gap = 0, capacity_violation = 0;  // optimality gap averaged over MoE layers; worst violation
  double leak_eval = 0, leak_train = 0;    // max causal leak over MoE layers, eval / training routing
  int64_t tokens = 0, k = 0, cap = 0;
};

// Optimality gap and causal leak of every MoE layer of `model` on the first `kGapSequences` sequences of
// `data`. The model is consumed: routing in training mode may move router state (a router's pending
// centroid sums), so the caller passes a copy restored from the checkpoint.
BatchMeasures measure_batch(TransformerLM& model, const PackedData& data, const RunConfig& cfg) {
  BatchMeasures r;
  torch::NoGradGuard ng;
  model->eval();
  const int64_t S = cfg.data.seq_len, B = std::min<int64_t>(kGapSequences, data.size());
  auto tokens = data.row_range(0, B).tokens;  // [B, S+1]
  auto layers = model->moe_layers();
  for (auto& l : layers) l->set_record_input(true);
  auto out = model->forward(tokens.narrow(1, 0, S));
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
  auto j = r->to_json();
  j["dead_experts"] = dead_experts(*r);
  // Assignments per token in evaluation routing, mean over MoE layers: equal compute shown, not assumed.
  double apt = 0;
  for (auto& l : r->layers) {
    int64_t sum = 0;
    for (auto x : l.load) sum += x;
    apt += double(sum) / double(std::max<int64_t>(r->tokens, 1)) / double(r->layers.size());
  }
  j["assignments_per_token"] = apt;
  // Tokens given no expert in evaluation routing (expert choice's thresholds can leave some), mean over
  // MoE layers.
  double unrouted = 0;
  for (auto& l : r->layers) unrouted += l.unrouted_share() / double(r->layers.size());
  j["unrouted_share"] = unrouted;
  return j;
}

// The logged curves of a run's metrics.jsonl (which covers the whole run, also across a resume: the trainer
// truncates it to the checkpoint's step).
struct Curves {
  nlohmann::json train = {
      {"step", nlohmann::json::array()},           {"loss", nlohmann::json::array()},
      {"max_vio_batch", nlohmann::json::array()},  {"dropped_share", nlohmann::json::array()},
      {"unrouted_share", nlohmann::json::array()}, {"assignments_per_token", nlohmann::json::array()}};
  nlohmann::json load_steps = nlohmann::json::array();  // per logged step: [E] load summed over MoE layers
  nlohmann::json validation = nlohmann::json::array(), heldout = nlohmann::json::array();  // [step, loss]
};

// A number of a metrics line; NaN for null (the trainer writes a non-finite loss as null) or a missing key.
double number_or_nan(const nlohmann::json& j, const char* key) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>()
                                               : std::numeric_limits<double>::quiet_NaN();
}

Curves read_curves(const fs::path& metrics) {
  Curves c;
  std::ifstream in(metrics);
  if (!in) throw FileError(metrics.string(), "cannot read the run's metrics");
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw FileError(metrics.string(), std::string("a line is not JSON: ") + e.what());
    }
    const std::string split = j.value("split", "");
    const int64_t step = j.value("step", int64_t{0});
    if (split == "validation" || split == "heldout") {
      (split == "validation" ? c.validation : c.heldout).push_back({step, number_or_nan(j, "loss")});
      continue;
    }
    if (split != "train") continue;
    c.train["step"].push_back(step);
    c.train["loss"].push_back(number_or_nan(j, "loss"));
    c.train["max_vio_batch"].push_back(number_or_nan(j, "max_vio_batch"));
    c.train["dropped_share"].push_back(j.contains("dropped_share") ? number_or_nan(j, "dropped_share") : 0.0);
    // Older metrics files have no unrouted share: NaN, which json_mean skips (never a made-up 0).
    c.train["unrouted_share"].push_back(number_or_nan(j, "unrouted_share"));
    const int64_t tokens = j.value("plan_tokens", int64_t{0});
    std::vector<int64_t> sum;
    double apt = 0;
    const auto& loads = j.contains("load") ? j["load"] : nlohmann::json::array();
    for (auto& layer : loads) {
      const auto l = layer.get<std::vector<int64_t>>();
      if (sum.empty()) sum.assign(l.size(), 0);
      int64_t n = 0;
      for (size_t e = 0; e < l.size() && e < sum.size(); ++e) {
        sum[e] += l[e];
        n += l[e];
      }
      if (tokens > 0) apt += double(n) / double(tokens) / double(loads.size());
    }
    c.train["assignments_per_token"].push_back(apt);
    c.load_steps.push_back(sum);
  }
  return c;
}

// Mean of the finite numbers of a JSON array (NaN is stored as null); NaN when there are none.
double json_mean(const nlohmann::json& a) {
  double s = 0;
  int64_t n = 0;
  for (auto& x : a)
    if (x.is_number() && std::isfinite(x.get<double>())) {
      s += x.get<double>();
      ++n;
    }
  return n ? s / double(n) : std::numeric_limits<double>::quiet_NaN();
}

bool valid_name(const std::string& s) {
  return !s.empty() &&
         std::all_of(s.begin(), s.end(),
                     [](char c) {
                       return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.';
                     }) &&
         s != "." && s != ".." && s != "plots";
}

std::vector<int64_t> toml_seeds(const toml::node& n, const std::string& key, const std::string& where) {
  const auto* a = n.as_array();
  if (!a || a->empty()) throw ConfigError(key, "expected a non-empty array of seeds (" + where + ")");
  std::vector<int64_t> out;
  for (auto& x : *a) {
    const auto v = x.value<int64_t>();
    if (!v || *v < 0) throw ConfigError(key, "seeds are integers >= 0 (" + where + ")");
    if (std::find(out.begin(), out.end(), *v) != out.end())
      throw ConfigError(key, "seed " + std::to_string(*v) + " is listed twice (" + where + ")");
    out.push_back(*v);
  }
  return out;
}

FaultSpec toml_fault(const toml::node& n, const std::string& key, const std::string& where) {
  const auto* t = n.as_table();
  if (!t)
    throw ConfigError(key,
                      "expected a table { step = N, expert = E, factor = X or \"nan\" } (" + where + ")");
  FaultSpec f;
  for (auto&& [k, v] : *t) {
    const std::string name(k.str());
    if (name == "step" || name == "expert") {
      const auto x = v.value<int64_t>();
      if (!x || *x < 0) throw ConfigError(key + "." + name, "expected an integer >= 0 (" + where + ")");
      (name == "step" ? f.step : f.expert) = *x;
    } else if (name == "factor") {
      if (auto s = v.value<std::string>()) {
        if (*s != "nan")
          throw ConfigError(key + ".factor", "a number or \"nan\", got \"" + *s + "\" (" + where + ")");
        f.factor = std::numeric_limits<double>::quiet_NaN();
      } else if (auto d = v.value<double>()) {
        f.factor = *d;
      } else {
        throw ConfigError(key + ".factor", "a number or \"nan\" (" + where + ")");
      }
    } else {
      throw ConfigError(key + "." + name, "unknown key; a fault has step, expert and factor (" + where + ")");
    }
  }
  if (f.step < 0) throw ConfigError(key + ".step", "a fault needs the step it starts at (" + where + ")");
  return f;
}

std::string run_dir_name(int64_t seed) {
  return "seed" + std::to_string(seed);
}

// Thrown out of a run that stopped early (a signal, or CompareOptions::stop_after_runs).
struct CompareStopped {
  int signal = 0;
};

}  // namespace

std::string FaultSpec::describe() const {
  if (!active()) return "none";
  std::ostringstream os;
  os << "expert " << expert << (std::isnan(factor) ? " NaN" : " x " + fmt(factor, 1)) << " from step "
     << step;
  return os.str();
}

Spread spread_of(const std::vector<double>& v) {
  Spread s;
  std::vector<double> ok;
  for (double x : v) (std::isfinite(x) ? ok.push_back(x) : void(++s.missing));
  s.n = int64_t(ok.size());
  if (ok.empty()) return s;
  s.min = *std::min_element(ok.begin(), ok.end());
  s.max = *std::max_element(ok.begin(), ok.end());
  for (double x : ok) s.mean += x / double(ok.size());
  if (ok.size() > 1) {
    double ss = 0;
    for (double x : ok) ss += (x - s.mean) * (x - s.mean);
    s.sd = std::sqrt(ss / double(ok.size() - 1));
  }
  return s;
}

int64_t time_to_balance(const std::vector<int64_t>& steps, const std::vector<double>& max_vio,
                        double threshold, size_t window) {
  window = std::max<size_t>(window, 1);
  int64_t first = -1;
  double sum = 0;
  for (size_t i = 0; i < steps.size() && i < max_vio.size(); ++i) {
    sum += max_vio[i];
    if (i >= window) sum -= max_vio[i - window];
    const double avg = sum / double(std::min(i + 1, window));
    if (!(avg < threshold))
      first = -1;
    else if (first < 0)
      first = steps[i];
  }
  return first;
}

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

std::vector<int64_t> parse_seed_list(const std::string& csv, const std::string& flag) {
  std::vector<int64_t> out;
  std::stringstream ss(csv);
  for (std::string item; std::getline(ss, item, ',');) {
    if (item.empty()) continue;
    size_t used = 0;
    int64_t v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || v < 0)
      throw ConfigError(flag, "'" + item + "' is not a seed (an integer >= 0)");
    if (std::find(out.begin(), out.end(), v) != out.end())
      throw ConfigError(flag, "seed " + item + " is listed twice");
    out.push_back(v);
  }
  if (out.empty()) throw ConfigError(flag, "expected a comma-separated list of seeds, e.g. 1,2,3");
  return out;
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

ComparePlan load_compare_plan(const std::string& path, const std::vector<std::string>& overrides,
                              const std::vector<std::string>& routers) {
  ComparePlan plan;
  toml::table doc;
  if (!path.empty()) doc = read_toml_file(path);
  std::optional<toml::table> cmp;
  if (auto* c = doc.get("compare")) {
    if (!c->as_table())
      throw ConfigError("compare", "expected a [compare] table (" + toml_place(path, *c) + ")");
    cmp = *c->as_table();
    doc.erase("compare");
  }
  {
    ConfigBinder b;
    bind_run_config(b, &plan.base);
    if (path.empty())
      b.apply_text(default_config_text(), "configs/default.toml (embedded)");
    else
      b.apply(doc, path);
    for (auto& o : overrides) b.apply_override(o);
    plan.base.validate();
  }
  plan.source = path.empty() ? "configs/default.toml (embedded)" : path;
  if (cmp) {
    for (auto&& [k, v] : *cmp) {
      const std::string key = "compare." + std::string(k.str());
      const std::string where = toml_place(path, v);
      if (key == "compare.seeds") {
        plan.seeds = toml_seeds(v, key, where);
      } else if (key == "compare.equivalence_ppl") {
        const auto x = v.value<double>();
        if (!x || !(*x > 0 && *x < 1))
          throw ConfigError(
              key,
              "must be a number in (0, 1): a relative perplexity bound, e.g. 0.01 for ±1% (" + where + ")");
        plan.equivalence_ppl = *x;
      } else if (key == "compare.variant") {
        const auto* arr = v.as_array();
        if (!arr) throw ConfigError(key, "expected [[compare.variant]] tables (" + where + ")");
        for (auto& item : *arr) {
          const auto* t = item.as_table();
          const std::string w = toml_place(path, item);
          if (!t) throw ConfigError(key, "each variant is a table (" + w + ")");
          CompareVariant var;
          for (auto&& [vk, vv] : *t) {
            const std::string name(vk.str());
            const std::string vkey = key + "." + name;
            const std::string vw = toml_place(path, vv);
            if (name == "name" || name == "router" || name == "role") {
              const auto s = vv.value<std::string>();
              if (!s) throw ConfigError(vkey, "expected a string (" + vw + ")");
              (name == "name" ? var.name : name == "router" ? var.router : var.role) = *s;
            } else if (name == "set") {
              const auto* a = vv.as_array();
              if (!a)
                throw ConfigError(vkey, "expected an array of \"section.key=value\" strings (" + vw + ")");
              for (auto& x : *a) {
                const auto s = x.value<std::string>();
                if (!s) throw ConfigError(vkey, "expected \"section.key=value\" strings (" + vw + ")");
                var.overrides.push_back(*s);
              }
            } else if (name == "seeds") {
              var.seeds = toml_seeds(vv, vkey, vw);
            } else if (name == "fault") {
              var.fault = toml_fault(vv, vkey, vw);
            } else {
              throw ConfigError(
                  vkey, "unknown key; a variant has name, router, set, seeds, role and fault (" + vw + ")");
            }
          }
          if (!valid_name(var.name))
            throw ConfigError(key + ".name",
                              "every variant needs a name of letters, digits, '_', '-' or '.' (" + w + ")");
          if (var.router.empty())
            throw ConfigError(key + ".router", "variant '" + var.name + "' has no router (" + w + ")");
          const auto known = router_names();
          if (std::find(known.begin(), known.end(), var.router) == known.end())
            throw ConfigError(key + ".router",
                              "variant '" + var.name + "': unknown router '" + var.router + "' (" + w + ")");
          for (auto& other : plan.variants)
            if (other.name == var.name)
              throw ConfigError(key + ".name", "variant '" + var.name + "' is listed twice (" + w + ")");
          plan.variants.push_back(std::move(var));
        }
      } else {
        throw ConfigError(
            key, "unknown key; [compare] has seeds, equivalence_ppl and [[compare.variant]] (" + where + ")");
      }
    }
  }
  if (plan.variants.empty() || !routers.empty()) {
    if (!plan.variants.empty())
      throw ConfigError("--routers",
                        "the config lists [[compare.variant]]s; pick among them with --variants");
    for (auto& r : routers.empty() ? router_names() : routers) {
      CompareVariant v;
      v.name = r;
      v.router = r;
      plan.variants.push_back(v);
    }
  }
  return plan;
}

void resolve_compare_plan(ComparePlan& plan, const std::string& only, const std::vector<int64_t>& seeds) {
  if (!seeds.empty()) plan.seeds = seeds;
  if (!only.empty()) {
    std::vector<CompareVariant> kept;
    std::stringstream ss(only);
    for (std::string name; std::getline(ss, name, ',');) {
      if (name.empty()) continue;
      auto it =
          std::find_if(plan.variants.begin(), plan.variants.end(), [&](auto& v) { return v.name == name; });
      if (it == plan.variants.end()) {
        std::string all;
        for (auto& v : plan.variants) all += (all.empty() ? "" : ",") + v.name;
        throw ConfigError("--variants", "no variant '" + name + "' (the plan has " + all + ")");
      }
      if (std::any_of(kept.begin(), kept.end(), [&](auto& v) { return v.name == name; }))
        throw ConfigError("--variants", "variant '" + name + "' is listed twice");
      kept.push_back(*it);
    }
    plan.variants = std::move(kept);
  }
  const std::string base = plan.base.to_toml();
  for (auto& v : plan.variants) {
    std::vector<std::string> o = {"moe.router=\"" + v.router + "\""};
    // A NaN fault makes steps non-finite: they are skipped (the weights stay), not the end of the run.
    if (v.fault.active()) o.push_back("train.nan_policy=\"skip\"");
    o.insert(o.end(), v.overrides.begin(), v.overrides.end());
    try {
      v.cfg = equal_compute_config(load_run_config_text(base, "compare variant " + v.name, o), v.router,
                                   &v.equal_compute);
    } catch (const ConfigError& e) {
      throw ConfigError(e.field(), "variant '" + v.name + "': " + e.what());
    }
    if (v.fault.active() && v.fault.expert >= v.cfg.moe.routed_experts())
      throw ConfigError("compare.variant.fault.expert", "variant '" + v.name + "': expert " +
                                                            std::to_string(v.fault.expert) + " of " +
                                                            std::to_string(v.cfg.moe.routed_experts()));
    if (v.fault.active() && v.fault.step >= v.cfg.train.steps)
      throw ConfigError("compare.variant.fault.step",
                        "variant '" + v.name + "': the fault starts after the last step");
  }
}

namespace {

std::string read_text(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The run.json of a (variant, seed) finished earlier with this fingerprint, or null when there is none; one
// made with another config is a ConfigError, an unreadable one a FileError.
nlohmann::json finished_run(const fs::path& run_json, const std::string& fingerprint, const CompareVariant& v,
                            int64_t seed) {
  if (!fs::exists(run_json)) return nullptr;
  nlohmann::json done;
  try {
    std::ifstream in(run_json);
    done = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw FileError(run_json.string(), std::string("not a finished run's record (") + e.what() +
                                           "); delete the folder to run it again");
  }
  // A run made before moeforge had some of today's keys ran today's config (a new key's default is what
  // moeforge did before it; docs/comparison.md, "Extending a comparison"): it is kept, and says so.
  std::vector<std::string> added;
  if (!fingerprint_extends(done.value("fingerprint", ""), fingerprint, &added))
    throw ConfigError("compare", run_json.string() + " was made with another config for variant '" + v.name +
                                     "' seed " + std::to_string(seed) +
                                     "; use a new --out, or delete that folder to run it again");
  if (!added.empty()) {
    done["keys_added_since"] = added;
    done["fingerprint"] = fingerprint;
  }
  return done;
}

// Whether the run in `dir` can be resumed (same fingerprint, a checkpoint before its last step, metrics);
// otherwise the folder is emptied and given the fingerprint, for a fresh run.
bool prepare_run_folder(const fs::path& dir, const std::string& fingerprint, int64_t steps) {
  const fs::path ckpts = dir / "checkpoints", fp_file = dir / "fingerprint.toml";
  const bool resumable = fs::exists(fp_file) && read_text(fp_file) == fingerprint && fs::exists(ckpts) &&
                         !fs::is_empty(ckpts) && fs::exists(dir / "metrics.jsonl");
  // A run stopped after its last checkpoint but before its run.json has nothing left to train, and the
  // trainer refuses to resume it: it is run again from the start (losing that one run, never a result).
  int64_t last_ckpt = -1;
  if (resumable)
    for (auto& e : fs::directory_iterator(ckpts)) {
      const std::string n = e.path().filename().string();
      if (n.rfind("step-", 0) == 0 && n.size() > 5 && std::all_of(n.begin() + 5, n.end(), ::isdigit))
        last_ckpt = std::max<int64_t>(last_ckpt, std::stoll(n.substr(5)));
    }
  if (resumable && last_ckpt < steps) return true;
  fs::remove_all(dir);  // a fresh run: metrics.jsonl must hold this run only
  fs::create_directories(dir);
  write_file_atomic(fp_file.string(), fingerprint);
  return false;
}

// A fingerprint's entries: "[section] key" -> its text (an entry is a `key = value` line and the lines that
// continue it, as a multi-line array; the fault comment is one entry of its own).
std::map<std::string, std::string> fingerprint_entries(const std::string& fp) {
  std::map<std::string, std::string> out;
  std::string section, key;
  std::istringstream in(fp);
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    if (line.front() == '[') {
      section = line;
      key.clear();
    } else if (line.rfind("# fault:", 0) == 0) {
      out["# fault"] = line;
      key.clear();
    } else if (line.front() != ' ' && line.front() != ']' && line.find(" = ") != std::string::npos) {
      key = section + " " + line.substr(0, line.find(" = "));
      out[key] = line;
    } else if (!key.empty()) {
      out[key] += "\n" + line;
    }
  }
  return out;
}

}  // namespace

std::string run_fingerprint(const CompareVariant& v, int64_t seed) {
  RunConfig cfg = v.cfg;
  cfg.train.seed = seed;
  return cfg.to_toml() + "\n# fault: " + v.fault.describe() + "\n";
}

bool fingerprint_extends(const std::string& before, const std::string& now, std::vector<std::string>* added,
                         std::string* differs) {
  const auto b = fingerprint_entries(before), n = fingerprint_entries(now);
  for (auto& [k, text] : b) {
    auto it = n.find(k);
    if (it == n.end() || it->second != text) {
      if (differs) *differs = text + (it == n.end() ? " (no such key now)" : " (now: " + it->second + ")");
      return false;
    }
  }
  if (added)
    for (auto& [k, text] : n)
      if (!b.count(k)) {
        const std::string sec = k.substr(1, k.find(']') - 1);
        added->push_back(sec + "." + text.substr(0, text.find("\n")));
      }
  return true;
}

int64_t reuse_runs(const ComparePlan& plan, const std::string& reuse, const std::string& out_dir,
                   std::ostream& log) {
  std::ifstream in(reuse);
  if (!in) throw FileError(reuse, "cannot read the comparison to reuse (--reuse)");
  nlohmann::json earlier;
  try {
    earlier = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw FileError(reuse, std::string("not a compare.json (") + e.what() + ")");
  }
  if (!earlier.is_object() || !earlier.contains("runs") || !earlier["runs"].is_array())
    throw FileError(reuse, "not a compare.json: no \"runs\" array");
  int64_t copied = 0;
  for (auto& v : plan.variants)
    for (int64_t seed : v.seeds.empty() ? plan.seeds : v.seeds) {
      const fs::path dir = fs::path(out_dir) / v.name / run_dir_name(seed);
      if (fs::exists(dir / "run.json")) continue;
      const nlohmann::json* found = nullptr;
      for (auto& r : earlier["runs"])
        if (r.is_object() && r.value("variant", "") == v.name && r.value("seed", int64_t{-1}) == seed)
          found = &r;
      if (!found) continue;
      const std::string now = run_fingerprint(v, seed);
      std::vector<std::string> added;
      std::string differs;
      if (!fingerprint_extends(found->value("fingerprint", ""), now, &added, &differs)) {
        log << "reuse: " << v.name << " seed " << seed << " not taken from " << reuse
            << ": its config differs at " << differs << "\n";
        continue;
      }
      nlohmann::json run = *found;
      run["reused"] = {{"from", reuse}, {"fingerprint", run.value("fingerprint", "")}, {"keys_added", added}};
      run["fingerprint"] = now;
      fs::create_directories(dir);
      write_file_atomic((dir / "run.json").string(), run.dump() + "\n");
      ++copied;
    }
  log << "reuse: " << copied << " finished runs taken from " << reuse << "\n";
  return copied;
}

namespace {

// One (variant, seed): trains it (or resumes it, or takes its finished run.json) and measures it.
nlohmann::json run_one(const CompareVariant& v, int64_t seed, const fs::path& dir, const CompareOptions& opt,
                       const std::string& label, const std::function<std::string(int64_t)>& extra,
                       int64_t stop_after, std::ostream& log) {
  RunConfig cfg = v.cfg;
  cfg.train.seed = seed;
  const std::string fingerprint = run_fingerprint(v, seed);
  const fs::path run_json = dir / "run.json";
  if (auto done = finished_run(run_json, fingerprint, v, seed); !done.is_null()) {
    log << label << ": finished earlier, kept (" << run_json.string() << ")\n";
    return done;
  }
  TrainOptions topt;
  topt.out_dir = dir.string();
  topt.progress = opt.progress;
  topt.progress_label = label;
  topt.progress_extra = extra;
  topt.stop_on_signal = true;
  topt.stop_after = stop_after;
  if (prepare_run_folder(dir, fingerprint, cfg.train.steps)) {
    topt.resume = (dir / "checkpoints").string();
    log << label << ": resuming from " << topt.resume << "\n";
  }
  if (v.fault.active()) {
    const FaultSpec f = v.fault;
    topt.before_step = [f](int64_t step, TransformerLM& model) {
      if (step < f.step) return;
      for (auto& l : model->moe_layers())
        if (l->fault_expert() < 0) l->set_fault(f.expert, f.factor);
    };
  }
  TrainSummary s;
  BatchMeasures bm;
  ModelCounts counts;
  bool causal = true;
  std::string router_label = v.router;
  try {
    s = train_model(cfg, topt, log);
    if (s.interrupted_by) throw CompareStopped{s.interrupted_by};
    if (s.step < cfg.train.steps) throw CompareStopped{0};  // stop_after: the simulated interruption
    auto lm = load_model(s.checkpoint);
    counts = count_model(*lm.model);
    // What the router says of its own setting (Router::causal, name): reports label non-causal runs.
    for (auto& l : lm.model->moe_layers()) {
      causal = causal && l->router->causal();
      router_label = l->router->name();
    }
    const std::string tok = lm.tokenizer->serialized();
    std::ostringstream quiet;
    DataBundle data = prepare_data(lm.cfg.data, &tok, quiet);
    bm = measure_batch(lm.model, data.validation, lm.cfg);
    if (opt.plots && s.validation) {
      ReportInputs rin;
      rin.run_dir = topt.out_dir;
      rin.title =
          "moeforge compare: " + v.name + " seed " + std::to_string(seed) + " (" + v.equal_compute + ")";
      rin.facts = {{"steps", std::to_string(s.step)},
                   {"validation perplexity", fmt(s.validation->perplexity, 2)},
                   {"MaxVio_global (validation)", fmt(s.validation->max_vio_global, 3)},
                   {"specialisation", fmt(s.validation->specialization, 3)}};
      rin.validation = &*s.validation;
      write_report(rin);
    }
  } catch (const CompareStopped&) {
    throw;
  } catch (const std::exception& e) {
    throw std::runtime_error("compare: variant " + v.name + " seed " + std::to_string(seed) + ": " +
                             e.what());
  }
  if (!s.validation) throw std::runtime_error("compare: variant " + v.name + ": no final validation");
  const Curves c = read_curves(dir / "metrics.jsonl");
  const auto steps = c.train["step"].get<std::vector<int64_t>>();
  const auto vio = c.train["max_vio_batch"].get<std::vector<double>>();
  nlohmann::json fault = nullptr;
  if (v.fault.active())
    fault = {{"step", v.fault.step},
             {"expert", v.fault.expert},
             {"factor", std::isnan(v.fault.factor) ? nlohmann::json("nan") : nlohmann::json(v.fault.factor)},
             {"describe", v.fault.describe()}};
  nlohmann::json run = {
      {"variant", v.name},
      {"router", v.router},
      {"role", v.role},
      {"group", v.group()},
      {"seed", seed},
      {"fingerprint", fingerprint},
      {"router_label", causal ? router_label : router_label + " [non-causal]"},
      {"causal", causal},
      {"equal_compute", v.equal_compute},
      {"overrides", v.overrides},
      {"moe",
       {{"n_expert", cfg.moe.n_expert},
        {"n_expert_used", cfg.moe.n_expert_used},
        {"n_cluster_used", cfg.moe.hierarchical.n_cluster_used},
        {"ec_capacity_factor", cfg.moe.expert_choice.capacity_factor},
        {"balance_coef", cfg.moe.balance_coef},
        {"reliability_decay", cfg.moe.hierarchical.reliability_decay},
        {"reliability", cfg.moe.hierarchical.reliability}}},
      {"active_params_per_token", counts.active_params},
      {"mflop_per_token", counts.flops_per_token / 1e6},
      {"steps", s.step},
      {"skipped_steps", s.skipped_steps},
      {"tokens_per_step", cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len},
      {"seconds", s.seconds},
      {"wall_tokens_per_s", s.tokens_per_s},
      {"first_batch", {{"tokens", s.first_batch_tokens}, {"digest", std::to_string(s.first_batch_digest)}}},
      {"curve", c.train},
      {"load_steps", c.load_steps},
      {"max_vio_batch_mean", json_mean(c.train["max_vio_batch"])},
      {"dropped_share_mean", json_mean(c.train["dropped_share"])},
      {"unrouted_share_mean", json_mean(c.train["unrouted_share"])},
      {"assignments_per_token_train", json_mean(c.train["assignments_per_token"])},
      {"time_to_balance", time_to_balance(steps, vio, kBalanceThreshold, kBalanceWindow)},  // as the report
      {"validation", eval_json(s.validation)},
      {"heldout", eval_json(s.heldout)},
      {"validation_curve", c.validation},
      {"heldout_curve", c.heldout},
      {"optimality_gap",
       {{"gap", bm.gap},
        {"capacity_violation", bm.capacity_violation},
        {"tokens", bm.tokens},
        {"k", bm.k},
        {"cap", bm.cap}}},
      {"causal_leak", {{"eval", bm.leak_eval}, {"train", bm.leak_train}}},
      {"fault", fault},
      {"checkpoint", s.checkpoint}};
  // Written last: its presence marks the run finished (a rerun keeps it).
  write_file_atomic(run_json.string(), run.dump() + "\n");
  log << label << ": validation ppl " << fmt(s.validation->perplexity, 2) << ", MaxVio_batch "
      << fmt(json_mean(c.train["max_vio_batch"]), 3) << ", MaxVio_global "
      << fmt(s.validation->max_vio_global, 3) << ", specialisation " << fmt(s.validation->specialization, 3)
      << ", optimality gap " << fmt(bm.gap, 4) << ", causal leak " << bm.leak_eval << " / " << bm.leak_train
      << "\n";
  return run;
}

}  // namespace

nlohmann::json run_compare(const ComparePlan& plan, const CompareOptions& opt, std::ostream& log) {
  const fs::path dir(opt.out_dir);
  fs::create_directories(dir);
  const auto t0 = std::chrono::steady_clock::now();
  if (!opt.reuse.empty()) reuse_runs(plan, opt.reuse, opt.out_dir, log);
  // What an earlier call of the same comparison measured after its runs (kept unless the variants changed).
  nlohmann::json previous;
  if (fs::exists(dir / "compare.json")) {
    try {
      std::ifstream in(dir / "compare.json");
      previous = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception&) {
      previous = nullptr;  // a torn file from an older version: every run.json still says what is done
    }
  }
  nlohmann::json variants = nlohmann::json::array();
  std::vector<std::pair<const CompareVariant*, int64_t>> todo;
  for (auto& v : plan.variants) {
    const auto seeds = v.seeds.empty() ? plan.seeds : v.seeds;
    variants.push_back({{"name", v.name},
                        {"router", v.router},
                        {"role", v.role},
                        {"group", v.group()},
                        {"seeds", seeds},
                        {"overrides", v.overrides},
                        {"equal_compute", v.equal_compute},
                        {"fault", v.fault.describe()}});
  }
  // Seed-major order (every variant's first seed, then every second seed, ...), the main variants before the
  // fault experiment: a comparison stopped early holds whole seeds of every main variant.
  for (const char* group : {"main", "fault"})
    for (size_t k = 0;; ++k) {
      bool any = false;
      for (auto& v : plan.variants) {
        const auto& seeds = v.seeds.empty() ? plan.seeds : v.seeds;
        if (v.group() == group && k < seeds.size()) {
          todo.push_back({&v, seeds[k]});
          any = true;
        }
      }
      if (!any) break;
    }
  nlohmann::json result = {{"command", opt.command},
                           {"machine", describe_machine()},
                           {"source", plan.source},
                           {"seeds", plan.seeds},
                           {"equivalence_ppl", plan.equivalence_ppl},
                           {"k", plan.base.moe.routed_used()},
                           {"steps", plan.base.train.steps},
                           {"batch_size", plan.base.train.batch_size},
                           {"seq_len", plan.base.data.seq_len},
                           {"config", plan.base.to_toml()},
                           {"variants", variants},
                           {"runs", nlohmann::json::array()},
                           {"complete", false}};
  double seconds_before = 0;
  if (previous.is_object()) seconds_before = previous.value("seconds_total", 0.0);

  // The whole comparison's progress: steps of the runs still to train, at the rate of this call so far.
  int64_t steps_total = 0, steps_done = 0;
  for (auto& [v, s] : todo)
    if (!fs::exists(dir / v->name / run_dir_name(s) / "run.json")) steps_total += v->cfg.train.steps;
  int64_t run_base = 0;
  auto overall = [&](int64_t step_in_run) {
    const int64_t done = steps_done + std::max<int64_t>(step_in_run - run_base, 0);
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double eta = done > 0 ? el / double(done) * double(steps_total - done) : NAN;
    std::ostringstream os;
    os << "all " << int(100.0 * double(done) / double(std::max<int64_t>(steps_total, 1))) << "%, ETA "
       << format_duration(eta);
    return os.str();
  };
  auto save = [&] {
    result["seconds_total"] =
        seconds_before + std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    write_file_atomic((dir / "compare.json").string(), result.dump() + "\n");
  };

  int64_t trained = 0;
  for (size_t i = 0; i < todo.size(); ++i) {
    const auto& [v, seed] = todo[i];
    const fs::path run_dir = dir / v->name / run_dir_name(seed);
    const bool finished = fs::exists(run_dir / "run.json");
    int64_t stop_after = 0;
    if (!finished && opt.stop_after_runs > 0 && trained >= opt.stop_after_runs) {
      if (opt.stop_after_steps <= 0) {
        log << "compare: stopped after " << trained << " runs (stop_after_runs); rerun to continue\n";
        save();
        return result;
      }
      stop_after = opt.stop_after_steps;
    }
    std::ostringstream label;
    label << "[" << i + 1 << "/" << todo.size() << "] " << v->name << " seed " << seed;
    if (!finished) log << "== compare " << label.str() << " (" << v->equal_compute << ") ==\n";
    run_base = 0;
    try {
      result["runs"].push_back(run_one(*v, seed, run_dir, opt, label.str(), overall, stop_after, log));
    } catch (const CompareStopped& stop) {
      if (stop.signal) result["interrupted_by"] = stop.signal;
      save();
      log << "compare: interrupted during " << label.str() << "; rerun the same command to continue\n";
      return result;
    }
    if (!finished) {
      ++trained;
      steps_done += v->cfg.train.steps;
      const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      // The whole comparison's bar, one line after each run (the run's own bar shows the ETA as it goes).
      const double frac = double(steps_done) / double(std::max<int64_t>(steps_total, 1));
      const int filled = int(frac * 24);
      if (opt.progress)
        log << "comparison [" << std::string(filled, '#') << std::string(24 - filled, '.') << "] " << trained
            << " runs trained this call, " << i + 1 << "/" << todo.size() << " done | " << format_duration(el)
            << " elapsed, ETA " << format_duration(el / frac - el) << "\n";
    }
    save();
  }

  // Phases after the runs: kept from an earlier call when the variants are the same.
  const bool same_variants = previous.is_object() && previous.value("variants", nlohmann::json()) == variants;
  if (opt.throughput) {
    if (same_variants && previous.contains("throughput")) {
      result["throughput"] = previous["throughput"];
    } else {
      std::vector<CompareVariant> main;
      for (auto& v : plan.variants)
        if (v.group() == "main") main.push_back(v);
      result["throughput"] = opt.throughput(main, log);
    }
    save();
  }
  if (opt.routing_scale) {
    if (same_variants && previous.contains("routing_scale"))
      result["routing_scale"] = previous["routing_scale"];
    else
      result["routing_scale"] = opt.routing_scale(log);
  }
  result["complete"] = true;
  save();
  log << "wrote " << write_compare_outputs(dir.string(), result, opt.plots) << "\n";
  return result;
}

}  // namespace moeforge
