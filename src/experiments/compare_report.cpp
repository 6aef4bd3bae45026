// moeforge compare's report: the runs of compare.json aggregated over seeds (mean, standard deviation,
// min-max), the claims of docs/comparison.md answered from those numbers, and the plots (gnuplot PNG).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <iomanip>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "moeforge/experiments/compare.h"
#include "moeforge/experiments/paired_stats.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"
#include "moeforge/util/gnuplot.h"
#include "moeforge/util/progress.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace moeforge {
namespace {

constexpr double kBalanced = kBalanceThreshold;  // compare.h says why 0.5
// The fault experiment's margin: the LM loss at the end of a faulty run counts as recovered when it is
// within this many nats of the fault-free run's over the same steps (about 1% of the loss at this scale,
// a few times the seed-to-seed spread of the final training loss).
constexpr double kRecoveryMargin = 0.05;
// A faulty expert's traffic counts as cut off when its share of the load falls under this fraction of
// the fair share 1/E.
constexpr double kCutOff = 0.1;

std::string fmt(double v, int precision) {
  if (!std::isfinite(v)) return "-";
  std::ostringstream os;
  os << std::fixed << std::setprecision(precision) << v;
  return os.str();
}

std::string quote(const std::string& s) {
  return "'" + s + "'";
}

double num(const json& j, double missing = NAN) {
  return j.is_number() ? j.get<double>() : missing;
}

struct Variant {
  std::string name, role, group, equal_compute, router;
  std::vector<const json*> runs;  // in seed order
};

std::vector<Variant> collect(const json& result) {
  std::vector<Variant> out;
  for (auto& v : result["variants"]) {
    Variant x;
    x.name = v["name"];
    x.role = v.value("role", "");
    x.group = v.value("group", "main");
    x.equal_compute = v.value("equal_compute", "");
    x.router = v.value("router", "");
    for (auto& r : result["runs"])
      if (r["variant"] == x.name) x.runs.push_back(&r);
    if (!x.runs.empty()) out.push_back(x);
  }
  return out;
}

using Getter = std::function<double(const json&)>;

Spread over(const Variant& v, const Getter& g) {
  std::vector<double> xs;
  for (auto* r : v.runs) xs.push_back(g(*r));
  return spread_of(xs);
}

// "mean ± sd [min–max]" (sd: sample standard deviation over seeds).
std::string cell(const Spread& s, int precision) {
  if (s.n == 0) return "-";
  std::string c = fmt(s.mean, precision);
  if (s.n > 1)
    c += " ± " + fmt(s.sd, precision) + " [" + fmt(s.min, precision) + "–" + fmt(s.max, precision) + "]";
  if (s.missing > 0) c += " (" + std::to_string(s.missing) + " never)";
  return c;
}

Getter split_get(const char* split, const char* key) {
  // value(): a key older runs do not have reads as missing (a const operator[] on a missing key is
  // undefined).
  return [=](const json& r) {
    const json sp = r.value(split, json());
    return sp.is_object() ? num(sp.value(key, json())) : NAN;
  };
}
const Getter kValPpl = split_get("validation", "perplexity");
const Getter kValLoss = split_get("validation", "loss");
const Getter kHeldPpl = split_get("heldout", "perplexity");
const Getter kMaxVioGlobal = split_get("validation", "max_vio_global");
const Getter kSpec = split_get("validation", "specialization");
const Getter kDead = split_get("validation", "dead_experts");
const Getter kAptEval = split_get("validation", "assignments_per_token");
const Getter kMaxVioBatch = [](const json& r) { return num(r["max_vio_batch_mean"]); };
// Time to balance, from the logged curve (compare.h): MaxVio_batch averaged over kBalanceWindow logged steps.
const Getter kTimeToBalance = [](const json& r) {
  std::vector<int64_t> steps;
  std::vector<double> vio;
  for (auto& x : r["curve"]["step"]) steps.push_back(x.get<int64_t>());
  for (auto& x : r["curve"]["max_vio_batch"]) vio.push_back(num(x));
  const int64_t t = time_to_balance(steps, vio, kBalanced, kBalanceWindow);
  return t < 0 ? NAN : double(t);
};
// Mean MaxVio_batch over the logged steps with `from` < step / last step <= `to` (finite values only).
double mean_vio_between(const json& r, double from, double to) {
  const auto& st = r["curve"]["step"];
  const auto& v = r["curve"]["max_vio_batch"];
  const double last = st.empty() ? 0 : st.back().get<double>();
  double s = 0;
  int n = 0;
  for (size_t i = 0; i < st.size(); ++i) {
    const double at = st[i].get<double>();
    if (at > from * last && at <= to * last && std::isfinite(num(v[i]))) {
      s += num(v[i]);
      ++n;
    }
  }
  return n ? s / n : NAN;
}
// The first tenth of the logged steps: how balanced a router is early in training.
const Getter kEarlyVio = [](const json& r) { return mean_vio_between(r, -1.0, 0.1); };
// The last tenth: the steady state, without the early steps a whole-run mean is dominated by (a bias that
// needs a few hundred steps to settle).
const Getter kLateVio = [](const json& r) { return mean_vio_between(r, 0.9, 1.0); };
const Getter kHeldLoss = split_get("heldout", "loss");
const Getter kDropped = [](const json& r) { return num(r["dropped_share_mean"]); };
const Getter kAptTrain = [](const json& r) { return num(r["assignments_per_token_train"]); };
const Getter kGap = [](const json& r) { return num(r["optimality_gap"]["gap"]); };
const Getter kViolation = [](const json& r) { return num(r["optimality_gap"]["capacity_violation"]); };
const Getter kLeakEval = [](const json& r) { return num(r["causal_leak"]["eval"]); };
const Getter kLeakTrain = [](const json& r) { return num(r["causal_leak"]["train"]); };
// Tokens given no expert (a measure newer than some runs: NaN where a run does not have it).
const Getter kUnroutedEval = split_get("validation", "unrouted_share");
const Getter kUnroutedTrain = [](const json& r) { return num(r.value("unrouted_share_mean", json())); };
// Expert choice evaluated with batch routing: exactly its training assignments per token (K on average).
const Getter kEcBatchLoss = split_get("validation", "ec_batch_loss");

// The validation loss against training tokens, mean over seeds at the evaluation steps every seed has.
struct Curve {
  std::vector<double> tokens, mean, lo, hi;
};
Curve validation_curve(const Variant& v) {
  std::map<int64_t, std::vector<double>> by_step;
  for (auto* r : v.runs)
    for (auto& p : (*r)["validation_curve"]) by_step[p[0].get<int64_t>()].push_back(num(p[1]));
  Curve c;
  const double tps = num((*v.runs.front())["tokens_per_step"], 0);
  for (auto& [step, xs] : by_step) {
    const auto s = spread_of(xs);
    if (xs.size() != v.runs.size() || s.n != int64_t(xs.size())) continue;  // a seed missing or non-finite
    c.tokens.push_back(double(step) * tps);
    c.mean.push_back(s.mean);
    c.lo.push_back(s.min);
    c.hi.push_back(s.max);
  }
  return c;
}

// Training tokens at which the curve first reaches `target` (linear between evaluations), NaN if never.
double tokens_to_reach(const Curve& c, double target) {
  for (size_t i = 0; i < c.mean.size(); ++i) {
    if (c.mean[i] > target) continue;
    if (i == 0) return c.tokens[0];
    const double f = (c.mean[i - 1] - target) / (c.mean[i - 1] - c.mean[i]);
    return c.tokens[i - 1] + f * (c.tokens[i] - c.tokens[i - 1]);
  }
  return NAN;
}

const Variant* by_role(const std::vector<Variant>& vs, const std::string& role) {
  for (auto& v : vs)
    if (v.role == role && v.group == "main") return &v;
  return nullptr;
}

const Variant* fault_reference(const std::vector<Variant>& vs) {
  for (auto& v : vs)
    if (v.role == "fault_reference") return &v;
  return by_role(vs, "hierarchical");
}

double throughput_of(const json& result, const std::string& name) {
  if (!result.contains("throughput") || !result["throughput"].contains("variants")) return NAN;
  const auto& t = result["throughput"]["variants"];
  return t.contains(name) ? num(t[name]["tokens_per_s"]) : NAN;
}

// --- Paired comparisons (docs/comparison.md, "Paired statistics") ---
// A seed fixes the data order and the initialisation of every variant, so two variants are compared by
// their per-seed difference: its mean and 95% Student-t interval over the seeds both ran.

struct Paired {
  std::string what;  // "<x> − <ref>: <measure>", for the multiple-comparison table
  PairedDifference d;
  bool log_ratio = false;  // a difference of losses, shown as a perplexity ratio
  // The pairs behind d: per seed, the reference's value and x's (claims.json).
  std::vector<int64_t> seeds;
  std::vector<double> ref_values, x_values;
};

// x − ref over the seeds both have a finite value for: `gx` of x's runs against `gref` of ref's.
Paired pair_up(const Variant& x, const Getter& gx, const Variant& ref, const Getter& gref,
               const std::string& what, bool log_ratio) {
  std::map<int64_t, double> at;
  for (auto* r : ref.runs) at[(*r)["seed"].get<int64_t>()] = gref(*r);
  Paired p;
  p.what = x.name + " − " + ref.name + ": " + what;
  p.log_ratio = log_ratio;
  for (auto* r : x.runs) {
    const int64_t seed = (*r)["seed"].get<int64_t>();
    const auto it = at.find(seed);
    const double xv = gx(*r);
    if (it == at.end() || !std::isfinite(xv) || !std::isfinite(it->second)) continue;
    p.seeds.push_back(seed);
    p.ref_values.push_back(it->second);
    p.x_values.push_back(xv);
  }
  p.d = paired_difference(p.ref_values, p.x_values);
  return p;
}

// x − ref of the measure `g` over the seeds both variants ran (finite values only).
Paired paired(const Variant& x, const Variant& ref, const Getter& g, const std::string& what,
              bool log_ratio = false) {
  return pair_up(x, g, ref, g, what, log_ratio);
}

// x's measure `gx` − ref's measure `gref`, paired by seed (two measures of the same kind, as one model's loss
// under two routings).
Paired paired_across(const Variant& x, const Getter& gx, const Variant& ref, const Getter& gref,
                     const std::string& what) {
  return pair_up(x, gx, ref, gref, what, false);
}

std::string signed_value(double v, const Paired& p, int precision) {
  if (!std::isfinite(v)) return v < 0 ? "−inf" : "+inf";
  if (p.log_ratio) {
    const double pct = (std::exp(v) - 1.0) * 100.0;
    return (pct >= 0 ? "+" : "") + fmt(pct, 2) + "%";
  }
  return (v >= 0 ? "+" : "") + fmt(v, precision);
}

// "<measure>, x − ref: +m [lo, hi] (paired over n seeds, 95% t interval)".
std::string interval_text(const Paired& p, int precision) {
  std::ostringstream os;
  os << p.what << " " << signed_value(p.d.mean, p, precision);
  if (p.d.n >= 2)
    os << " [" << signed_value(p.d.lo, p, precision) << ", " << signed_value(p.d.hi, p, precision)
       << "] (paired over " << p.d.n << " seeds, 95% t interval)";
  else
    os << " (" << p.d.n << " paired seed" << (p.d.n == 1 ? "" : "s") << ": no interval)";
  return os.str();
}

// The seeds an interval at this sd needs to have half-width `half` (a guide for the next run's seeds).
std::string seeds_needed(const Paired& p, double half, const std::string& to_what) {
  if (p.d.n < 2 || !(p.d.sd > 0) || !(half > 0)) return "";
  return "; seeds for " + to_what + " (at this sd): " + std::to_string(seeds_for_half_width(p.d.sd, half));
}

// A direction test ("x lower than ref", or higher when `higher_is_claimed`): the evidence line; the verdict
// is direction_verdict's.
std::string direction_text(const Paired& p, int precision, bool higher_is_claimed, PairedVerdict* v) {
  *v = direction_verdict(p.d);
  std::string out = interval_text(p, precision) + " — ";
  if (*v == PairedVerdict::kLower)
    out += std::string("lower, resolved") + (higher_is_claimed ? " (against the claim)" : "");
  else if (*v == PairedVerdict::kHigher)
    out += std::string("higher, resolved") + (higher_is_claimed ? "" : " (against the claim)");
  else
    out += "not resolved (the interval spans 0)" +
           seeds_needed(p, std::abs(p.d.mean), "an interval that excludes 0 at this mean");
  return out;
}

// An "equal or better" test of a loss difference within the relative perplexity bound `bound`.
std::string equivalence_text(const Paired& p, double bound, PairedVerdict* v) {
  const double b = std::log1p(bound);
  *v = equivalence_verdict(p.d, b);
  const std::string pm = fmt(bound * 100.0, 1) + "%";
  std::string out = interval_text(p, 4) + " — ";
  switch (*v) {
    case PairedVerdict::kLower:
      out += "lower, resolved";
      break;
    case PairedVerdict::kEquivalent:
      out += "equivalent within ±" + pm;
      break;
    case PairedVerdict::kNotWorse:
      out += "not worse than +" + pm;
      break;
    case PairedVerdict::kHigher:
      out += "higher, resolved";
      break;
    case PairedVerdict::kNotResolved:
      out += "not resolved: the interval reaches " + signed_value(p.d.hi, p, 4) + ", past the +" + pm +
             " bound" +
             (std::abs(p.d.mean) < b ? seeds_needed(p, b - std::abs(p.d.mean), "±" + pm + " at this mean")
                                     : std::string("; the mean itself is past the bound"));
      break;
  }
  return out;
}

bool not_worse(PairedVerdict v) {
  return v == PairedVerdict::kLower || v == PairedVerdict::kEquivalent || v == PairedVerdict::kNotWorse;
}

// Per logged step of one run: the faulty expert's share of the load (all MoE layers).
std::vector<std::pair<int64_t, double>> fault_share(const json& r, int64_t expert) {
  std::vector<std::pair<int64_t, double>> out;
  const auto& steps = r["curve"]["step"];
  const auto& loads = r["load_steps"];
  for (size_t i = 0; i < steps.size() && i < loads.size(); ++i) {
    double total = 0;
    for (auto& x : loads[i]) total += x.get<double>();
    const double e = loads[i].size() > size_t(expert) ? loads[i][size_t(expert)].get<double>() : 0;
    out.push_back({steps[i].get<int64_t>(), total > 0 ? e / total : 0});
  }
  return out;
}

// Mean of the logged training loss over steps in (from, to].
double mean_loss(const json& r, int64_t from, int64_t to) {
  double s = 0;
  int n = 0;
  const auto& steps = r["curve"]["step"];
  const auto& loss = r["curve"]["loss"];
  for (size_t i = 0; i < steps.size(); ++i) {
    const int64_t st = steps[i].get<int64_t>();
    if (st > from && st <= to) {
      if (!std::isfinite(num(loss[i]))) continue;
      s += num(loss[i]);
      ++n;
    }
  }
  return n ? s / n : NAN;
}

struct Claim {
  std::string title, verdict;
  std::vector<std::string> evidence;
};

// What the claims share: the equivalence bound and every paired test, for the multiple-comparison table.
struct ClaimContext {
  double bound = 0.01;  // compare.equivalence_ppl
  std::vector<Paired> tests;
  const Paired& add(Paired p) {
    tests.push_back(std::move(p));
    return tests.back();
  }
};

// Claim 1, loss-free balancing against the balance loss: lower MaxVio_global (a direction) at equal or
// better perplexity (within the bound).
std::optional<Claim> claim_loss_free(const Variant* lf, const Variant* bl, ClaimContext& cx) {
  if (!bl || !lf) return std::nullopt;
  Claim c{
      "1. Loss-free balancing (Wang et al. 2024) reaches a lower MaxVio_global than the balance loss at "
      "equal or better perplexity (paper, 1B: 0.04 vs 0.72, perplexity 9.50 vs 9.56)",
      "",
      {}};
  PairedVerdict mv, pv, lv;
  c.evidence.push_back(
      direction_text(cx.add(paired(*lf, *bl, kMaxVioGlobal, "MaxVio_global")), 3, false, &mv));
  c.evidence.push_back(
      equivalence_text(cx.add(paired(*lf, *bl, kValLoss, "validation perplexity", true)), cx.bound, &pv));
  c.evidence.push_back(direction_text(
      cx.add(paired(*lf, *bl, kLateVio, "MaxVio_batch over the last tenth of the steps")), 3, false, &lv));
  c.evidence.push_back(
      "MaxVio_batch over the whole run (dominated by the steps the bias needs to settle): " + lf->name + " " +
      cell(over(*lf, kMaxVioBatch), 3) + " vs " + bl->name + " " + cell(over(*bl, kMaxVioBatch), 3));
  if (mv == PairedVerdict::kLower && not_worse(pv))
    c.verdict = "reproduced";
  else if (mv == PairedVerdict::kHigher || pv == PairedVerdict::kHigher)
    c.verdict = "not reproduced";
  else
    c.verdict = "not resolved";
  return c;
}

// Claim 2, BIP: faster balance early, and the others' perplexity with less compute.
std::optional<Claim> claim_bip(const Variant* bip, const Variant* lf, const Variant* bl, const json& result,
                               ClaimContext& cx) {
  if (!bip || (!lf && !bl)) return std::nullopt;
  Claim c{
      "2. BIP balancing (Sun et al. 2025) balances faster early in training than loss-free and the balance "
      "loss, and reaches their perplexity with less compute (paper: at least 13% less time)",
      "",
      {}};
  bool faster_all = true, slower_any = false, cheaper_all = true;
  const auto bip_curve = validation_curve(*bip);
  for (const Variant* o : {lf, bl}) {
    if (!o) continue;
    PairedVerdict ev, tv;
    c.evidence.push_back(direction_text(
        cx.add(paired(*bip, *o, kEarlyVio, "mean MaxVio_batch over the first tenth of the steps")), 3, false,
        &ev));
    const auto tb = over(*bip, kTimeToBalance), to = over(*o, kTimeToBalance);
    if (tb.missing == 0 && to.missing == 0)
      c.evidence.push_back(
          direction_text(cx.add(paired(*bip, *o, kTimeToBalance, "time to balance (steps)")), 0, false, &tv));
    else
      c.evidence.push_back("time to balance (steps): " + bip->name + " " + cell(tb, 0) + " vs " + o->name +
                           " " + cell(to, 0));
    faster_all = faster_all && ev == PairedVerdict::kLower;
    slower_any = slower_any || ev == PairedVerdict::kHigher;
    const auto oc = validation_curve(*o);
    if (oc.mean.empty() || bip_curve.mean.empty()) continue;
    const double target = oc.mean.back();
    const double tb_tok = tokens_to_reach(bip_curve, target), to_tok = tokens_to_reach(oc, target);
    const double time_ratio =
        (tb_tok / to_tok) * (throughput_of(result, o->name) / throughput_of(result, bip->name));
    const double tok_ratio = tb_tok / to_tok;
    c.evidence.push_back(
        "tokens to reach " + o->name + "'s final mean validation loss " + fmt(target, 4) + ": " + bip->name +
        " " + (std::isfinite(tb_tok) ? fmt(tb_tok / 1e6, 3) + "M" : "never") + " vs " + o->name + " " +
        fmt(to_tok / 1e6, 3) + "M (ratio " + fmt(tok_ratio, 3) + "; time ratio at the measured tokens/s " +
        fmt(time_ratio, 3) + "; from the mean curves: a point estimate without an interval)");
    const bool cheaper =
        std::isfinite(time_ratio) ? time_ratio <= 0.87 : (std::isfinite(tok_ratio) && tok_ratio <= 0.87);
    cheaper_all = cheaper_all && cheaper;
  }
  c.evidence.push_back(
      "time to balance: the first step from which MaxVio_batch, averaged over " +
      std::to_string(kBalanceWindow) + " logged steps, stays under " + fmt(kBalanced, 1) +
      "; the validation curves are means over seeds at the evaluation steps; 0.87 = the paper's 13% saving");
  if (faster_all && cheaper_all)
    c.verdict = "reproduced";
  else if (slower_any)
    c.verdict = "not reproduced";
  else if (faster_all)
    c.verdict = "mixed (balances faster early, resolved; not cheaper to the others' perplexity)";
  else
    c.verdict = "not resolved";
  return c;
}

// Claim 3, expert choice against top-2 at equal compute, and the leak of its non-causal form.
std::optional<Claim> claim_expert_choice(const Variant* ec, const Variant* ecn, const Variant* bl,
                                         const Variant* cap, const Variant* rerun, int64_t ec_k,
                                         ClaimContext& cx) {
  if (!ec || !bl) return std::nullopt;
  Claim c{
      "3. Expert choice (Zhou et al. 2022) converges faster than top-2 at equal compute (paper: 2x at "
      "8B/64E); the leak of non-causal expert choice against the causal-safe variant",
      "",
      {}};
  PairedVerdict lv;
  c.evidence.push_back(
      direction_text(cx.add(paired(*ec, *bl, kValLoss, "final validation loss")), 4, false, &lv));
  c.evidence.push_back("assignments per token in evaluation (threshold routing) " + ec->name + " " +
                       cell(over(*ec, kAptEval), 3) + " vs " + bl->name + " " + cell(over(*bl, kAptEval), 3) +
                       "; training " + cell(over(*ec, kAptTrain), 3) + "; share of assignments " + bl->name +
                       " drops: " + cell(over(*bl, kDropped), 4) + " (dropless)");
  // At equal assignments: the same models evaluated with batch routing, K per token exactly (the rows of an
  // evaluation batch are windows of different documents, so it sees no row's own future).
  PairedVerdict ev;
  c.evidence.push_back(direction_text(
      cx.add(paired_across(*ec, kEcBatchLoss, *bl, kValLoss,
                           "validation loss at equal assignments (expert choice batch-routed, " +
                               fmt(double(ec_k), 0) + " per token)")),
      4, false, &ev));
  if (cap) {
    PairedVerdict cv;
    c.evidence.push_back(direction_text(
        cx.add(paired(*ec, *cap, kValLoss, "final validation loss, against the paper's kind of baseline")), 4,
        false, &cv));
    c.evidence.push_back(
        cap->name + " (top-2 with capacity 1.25, the overflow dropped) drops " +
        cell(over(*cap, kDropped), 4) + " of its assignments in training, " +
        cell(over(*cap, kUnroutedTrain), 4) + " of its tokens get no expert; its validation loss " +
        "against dropless " + bl->name + ": " +
        interval_text(cx.add(paired(*cap, *bl, kValLoss, "validation perplexity", true)), 4) +
        "; capacity makes a token's route depend on the tokens after it (causal leak " +
        cell(over(*cap, kLeakEval), 4) + ")");
  }
  if (rerun) {
    c.evidence.push_back("tokens expert choice gives no expert (" + rerun->name + ", today's code, " +
                         std::to_string(rerun->runs.size()) + " seed" + (rerun->runs.size() == 1 ? "" : "s") +
                         "): " + cell(over(*rerun, kUnroutedEval), 4) +
                         " of validation tokens under threshold "
                         "routing, " +
                         cell(over(*rerun, kUnroutedTrain), 4) + " of training tokens per batch");
    const Paired drift = paired(*rerun, *ec, kValLoss, "validation loss");
    c.evidence.push_back("the same run trained again with today's code against the committed one (" +
                         rerun->name + " − " + ec->name + ", " + std::to_string(drift.d.n) + " seed" +
                         (drift.d.n == 1 ? "" : "s") + "): " + signed_value(drift.d.mean, drift, 4) +
                         " nats (what code changes since the committed runs move a result; the seed sd of "
                         "the validation loss is the calibration's)");
  }
  const auto ecc = validation_curve(*ec), blc = validation_curve(*bl);
  double ratio = NAN;
  if (!ecc.mean.empty() && !blc.mean.empty()) {
    const double target = blc.mean.back();
    ratio = tokens_to_reach(ecc, target) / tokens_to_reach(blc, target);
    c.evidence.push_back("tokens to reach " + bl->name + "'s final mean validation loss, " + ec->name +
                         " / " + bl->name + ": " +
                         (std::isfinite(ratio) ? fmt(ratio, 3) : std::string("never reached")) +
                         " (0.5 = the paper's 2x; from the mean curves, no interval)");
  }
  c.evidence.push_back("causal leak of " + ec->name + " (max |y' - y|, evaluation / training routing): " +
                       cell(over(*ec, kLeakEval), 6) + " / " + cell(over(*ec, kLeakTrain), 6));
  if (ecn)
    c.evidence.push_back("causal leak of " + ecn->name + ": " + cell(over(*ecn, kLeakEval), 6) + " / " +
                         cell(over(*ecn, kLeakTrain), 6) + "; its validation loss " +
                         cell(over(*ecn, kValLoss), 4) +
                         " (training routing sees the future; evaluation uses "
                         "thresholds)");
  if (lv == PairedVerdict::kLower)
    c.verdict = std::isfinite(ratio) && ratio <= 0.5 ? "reproduced" : "mixed (lower loss, resolved; not 2x)";
  else
    c.verdict = lv == PairedVerdict::kHigher ? "not reproduced" : "not resolved";
  return c;
}

// Claim 4, MoCE's specialisation (higher, a direction) and held-out perplexity (not worse, within the
// bound) against one router.
std::optional<Claim> claim_moce(const Variant* moce, const Variant* bl, ClaimContext& cx) {
  if (!moce || !bl) return std::nullopt;
  Claim c{
      "4. MoCE (Eo et al. 2025): experts specialise by genre more than with one router, while "
      "held-out-genre "
      "perplexity is not worse",
      "",
      {}};
  PairedVerdict sv, hv, vv;
  c.evidence.push_back(direction_text(
      cx.add(paired(*moce, *bl, kSpec, "specialisation I(genre; expert)/H(genre)")), 3, true, &sv));
  c.evidence.push_back(equivalence_text(
      cx.add(paired(*moce, *bl, kHeldLoss, "held-out genre perplexity", true)), cx.bound, &hv));
  c.evidence.push_back(
      equivalence_text(cx.add(paired(*moce, *bl, kValLoss, "validation perplexity", true)), cx.bound, &vv));
  if (sv == PairedVerdict::kHigher && not_worse(hv))
    c.verdict = "reproduced";
  else if (sv == PairedVerdict::kLower || hv == PairedVerdict::kHigher)
    c.verdict = sv == PairedVerdict::kHigher ? "not reproduced (specialises more, resolved; but held-out "
                                               "perplexity worse, resolved)"
                                             : "not reproduced";
  else
    c.verdict = "not resolved";
  return c;
}

// 0: does routing matter at this scale? Top-2 against dense FFNs at equal active parameters (one FFN of the
// compute of K experts) and at equal total parameters (one FFN as wide as all experts together).
std::optional<Claim> baselines(const Variant* moe, const Variant* dense_active, const Variant* dense_total,
                               ClaimContext& cx) {
  if (!moe || (!dense_active && !dense_total)) return std::nullopt;
  Claim c{"0. Baselines: does routing pay at this scale? " + moe->name +
              " against dense FFNs with its active parameters and with its total parameters",
          "",
          {}};
  PairedVerdict av = PairedVerdict::kNotResolved, tv = PairedVerdict::kNotResolved;
  if (dense_active)
    c.evidence.push_back(
        direction_text(cx.add(paired(*moe, *dense_active, kValLoss,
                                     "validation perplexity (equal active parameters)", true)),
                       4, false, &av));
  if (dense_total)
    c.evidence.push_back(direction_text(
        cx.add(paired(*moe, *dense_total, kValLoss, "validation perplexity (equal total parameters)", true)),
        4, false, &tv));
  for (const Variant* d : {dense_active, dense_total})
    if (d)
      c.evidence.push_back(d->name + ": validation perplexity " + cell(over(*d, kValPpl), 2) + ", held-out " +
                           cell(over(*d, kHeldPpl), 2) + "; " +
                           fmt(num(d->runs.front()->value("mflop_per_token", json())), 2) +
                           " MFLOP per token vs " +
                           fmt(num(moe->runs.front()->value("mflop_per_token", json())), 2));
  const auto word = [](PairedVerdict v, const char* than) {
    return v == PairedVerdict::kLower    ? std::string("better than ") + than + " (resolved)"
           : v == PairedVerdict::kHigher ? std::string("worse than ") + than + " (resolved)"
                                         : std::string("not resolved against ") + than;
  };
  c.verdict = "top-2 MoE " + word(av, "dense at equal active parameters") + "; " +
              word(tv, "dense at equal total parameters");
  return c;
}

// 4b: where MoCE's cost lies. Each ablation changes one thing of MoCE; its loss against MoCE's says whether
// that thing costs (lower, resolved: the change recovers part of the cost), and against the one router
// whether anything is left.
std::optional<Claim> moce_ablations(const std::vector<Variant>& vs, const Variant* bl, ClaimContext& cx) {
  const Variant* moce = by_role(vs, "moce");
  std::vector<const Variant*> abl;
  for (auto& v : vs)
    if (v.role == "moce_ablation" && v.group == "main") abl.push_back(&v);
  if (!moce || abl.empty()) return std::nullopt;
  Claim c{"4b. Where MoCE's cost lies: ablations that each change one thing of " + moce->name, "", {}};
  std::vector<std::string> recover, worse;
  for (const Variant* a : abl) {
    PairedVerdict v;
    c.evidence.push_back(
        direction_text(cx.add(paired(*a, *moce, kValLoss, "validation perplexity", true)), 4, false, &v));
    if (v == PairedVerdict::kLower) recover.push_back(a->name);
    if (v == PairedVerdict::kHigher) worse.push_back(a->name);
    if (bl)
      c.evidence.push_back(interval_text(paired(*a, *bl, kValLoss, "validation perplexity", true), 4) +
                           " (against the one router; not in the family table)");
  }
  const auto join = [](const std::vector<std::string>& xs) {
    std::string out;
    for (auto& x : xs) out += (out.empty() ? "" : ", ") + x;
    return out;
  };
  c.verdict = recover.empty() ? "not located: no single change resolves lower than " + moce->name
                              : "located in part: " + join(recover) + " resolve lower than " + moce->name;
  if (!worse.empty()) c.verdict += "; " + join(worse) + " resolve higher";
  return c;
}

// Claim 5, first half: route() and layer time from the smallest to the largest E, topk against
// hierarchical. Returns "reproduced" when the hierarchical times grow more slowly on both timings.
std::string routing_scale_evidence(const json& result, Claim& c) {
  if (!result.contains("routing_scale") || !result["routing_scale"].contains("points")) return "";
  const auto& pts = result["routing_scale"]["points"];
  if (pts.size() < 2) return "";
  const auto& a = pts.front();
  const auto& b = pts.back();
  int slower_growth = 0, faster_everywhere = 0;
  for (const char* what : {"route_ms", "layer_ms"}) {
    const double gt = num(b["topk"][what]) / num(a["topk"][what]);
    const double gh = num(b["hierarchical"][what]) / num(a["hierarchical"][what]);
    bool hier_slower_everywhere = true;
    for (auto& pt : pts)
      hier_slower_everywhere =
          hier_slower_everywhere && num(pt["hierarchical"][what]) > num(pt["topk"][what]);
    c.evidence.push_back(
        std::string(what == std::string("route_ms") ? "route()" : "layer forward+backward") +
        " time from E = " + std::to_string(a["E"].get<int64_t>()) +
        " to E = " + std::to_string(b["E"].get<int64_t>()) + ": topk x" + fmt(gt, 2) + ", hierarchical x" +
        fmt(gh, 2) + " (at E = " + std::to_string(b["E"].get<int64_t>()) + ": " +
        fmt(num(b["topk"][what]), 2) + " vs " + fmt(num(b["hierarchical"][what]), 2) + " ms" +
        (hier_slower_everywhere ? "; hierarchical slower at every E measured" : "") + ")");
    slower_growth += gh < gt;
    faster_everywhere += !hier_slower_everywhere;
  }
  c.evidence.push_back(
      "complexity: flat top-K scores all E experts per token, O(E·C); hierarchical with √E clusters of √E "
      "experts scores √E centroids and then the √E experts of its clusters, O(√E·C) — a square root, not a "
      "logarithm — plus its fixed costs (two softmaxes, the cluster gather), which dominate at these E");
  return slower_growth == 2
             ? "growth slower, reproduced" +
                   std::string(faster_everywhere == 0 ? " (absolute cost higher at every E)" : "")
             : "not reproduced";
}

// Claim 5, second half: each fault run's faulty-expert share and loss against the fault-free reference of
// its seed; per kind of fault, whether reliability tracking is what makes the difference. Returns the
// half's verdict.
std::string fault_evidence(const std::vector<Variant>& vs, Claim& c) {
  struct Outcome {
    bool cut = false, recovered = false;
  };
  // kind of fault -> reliability on/off -> outcomes over seeds
  std::map<std::string, std::map<bool, std::vector<Outcome>>> kinds;
  for (auto& v : vs) {
    if (v.group != "fault" || v.role == "fault_reference") continue;
    for (auto* r : v.runs) {
      const auto& f = (*r)["fault"];
      const int64_t e = f["expert"].get<int64_t>(), at = f["step"].get<int64_t>();
      const bool rel = num((*r)["moe"]["reliability"], 1.0) != 0.0;
      const int64_t last = (*r)["steps"].get<int64_t>();
      const int64_t window = std::max<int64_t>(1, (last - at) / 5);
      double share = 0;
      int n = 0;
      for (auto& [st, sh] : fault_share(*r, e))
        if (st > last - window) {
          share += sh;
          ++n;
        }
      share = n ? share / n : NAN;
      const double fair = 1.0 / double(num((*r)["moe"]["n_expert"], 1));
      // The fault-free reference (role fault_reference, else the hierarchical variant): its run of the same
      // seed, over the same steps.
      const json* ref = nullptr;
      if (const Variant* rv = fault_reference(vs))
        for (auto* h : rv->runs)
          if ((*h)["seed"] == (*r)["seed"]) ref = h;
      const double lf_end = mean_loss(*r, last - window, last);
      const double ref_end = ref ? mean_loss(*ref, last - window, last) : NAN;
      const int64_t skipped = (*r)["skipped_steps"].get<int64_t>();
      Outcome o;
      o.cut = share < kCutOff * fair;
      o.recovered = std::isfinite(lf_end) && std::isfinite(ref_end) && lf_end - ref_end <= kRecoveryMargin;
      kinds[f["describe"].get<std::string>()][rel].push_back(o);
      c.evidence.push_back(v.name + " (" + f["describe"].get<std::string>() + ", reliability " +
                           (rel ? "on" : "off") + ", seed " + std::to_string((*r)["seed"].get<int64_t>()) +
                           "): faulty expert's share of the load over the last " + std::to_string(window) +
                           " steps " + fmt(share, 4) + (skipped > 0 ? " (over the finite steps only)" : "") +
                           " (fair share " + fmt(fair, 4) + "); training loss there " + fmt(lf_end, 3) +
                           " vs fault-free " + fmt(ref_end, 3) + " (" +
                           (o.recovered ? "within" : "not within") + " " + fmt(kRecoveryMargin, 2) +
                           " nats); " + std::to_string(skipped) + " of " + std::to_string(last - at) +
                           " steps after the fault skipped as non-finite");
    }
  }
  if (kinds.empty()) return "";
  int discriminating = 0, consistent = 0;
  size_t min_seeds = SIZE_MAX;
  for (auto& [kind, by] : kinds) {
    const auto& on = by[true];
    const auto& off = by[false];
    min_seeds = std::min({min_seeds, on.size(), off.size()});
    const bool off_survives =
        !off.empty() && std::all_of(off.begin(), off.end(), [](const Outcome& o) { return o.recovered; });
    const bool on_survives = !on.empty() && std::all_of(on.begin(), on.end(), [](const Outcome& o) {
      return o.recovered && o.cut;
    });
    std::string what;
    if (off_survives) {
      what = "not discriminating: the run without reliability recovers too";
    } else {
      ++discriminating;
      consistent += on_survives;
      what =
          on_survives ? "reliability recovers, the run without it does not" : "reliability does not recover";
    }
    c.evidence.push_back("fault " + kind + ": " + what + " (" + std::to_string(on.size()) + " / " +
                         std::to_string(off.size()) + " seeds with / without reliability)");
  }
  if (discriminating == 0) return "not discriminating (the runs without reliability recover too)";
  if (min_seeds < 3)
    return "not resolved (" + std::to_string(min_seeds) + " seed" + (min_seeds == 1 ? "" : "s") +
           " per fault run; 3 needed)";
  return consistent == discriminating ? "reproduced" : "not reproduced";
}

// Claim 5, ClusterMoE: routing cost against E, and reliability tracking under a fault; a verdict per half.
std::optional<Claim> claim_cluster_moe(const std::vector<Variant>& vs, const json& result) {
  Claim c{
      "5. ClusterMoE: hierarchical routing cost grows more slowly than flat top-K as E grows; reliability "
      "tracking survives a faulty expert",
      "",
      {}};
  const auto cost = routing_scale_evidence(result, c);
  const auto fault = fault_evidence(vs, c);
  if (c.evidence.empty()) return std::nullopt;
  c.verdict = "routing cost: " + (cost.empty() ? std::string("not measured") : cost) +
              "; reliability under a fault: " + (fault.empty() ? std::string("not measured") : fault);
  return c;
}

// 6: the optimality gap of each main variant (a measure, no claim to judge).
Claim optimality_gaps(const std::vector<Variant>& vs) {
  Claim c{
      "6. The optimality gap of each router's assignments on validation batches (against the exact "
      "balanced "
      "optimum)",
      "measured",
      {}};
  for (auto& v : vs)
    if (v.group == "main")
      c.evidence.push_back(v.name + ": gap " + cell(over(v, kGap), 4) + ", capacity violation " +
                           cell(over(v, kViolation), 3));
  return c;
}

std::vector<Claim> answer_claims(const std::vector<Variant>& vs, const json& result, ClaimContext& cx) {
  const Variant* bl = by_role(vs, "balance_loss");
  const Variant* lf = by_role(vs, "loss_free");
  std::vector<Claim> claims;
  if (auto b = baselines(bl, by_role(vs, "dense_active"), by_role(vs, "dense_total"), cx))
    claims.push_back(*b);
  for (auto c :
       {claim_loss_free(lf, bl, cx), claim_bip(by_role(vs, "bip"), lf, bl, result, cx),
        claim_expert_choice(by_role(vs, "expert_choice"), by_role(vs, "expert_choice_noncausal"), bl,
                            by_role(vs, "capacity"), by_role(vs, "expert_choice_rerun"),
                            result.value("k", int64_t{2}), cx),
        claim_moce(by_role(vs, "moce"), bl, cx), moce_ablations(vs, bl, cx), claim_cluster_moe(vs, result)})
    if (c) claims.push_back(*c);
  claims.push_back(optimality_gaps(vs));
  return claims;
}

// Trailing moving average over `window` values.
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

// Mean over a variant's seeds of one logged per-step curve, at the logged steps all seeds share.
std::pair<std::vector<int64_t>, std::vector<double>> mean_curve(const Variant& v, const char* key) {
  std::map<int64_t, std::vector<double>> at;
  for (auto* r : v.runs) {
    const auto& st = (*r)["curve"]["step"];
    const auto& x = (*r)["curve"][key];
    for (size_t i = 0; i < st.size(); ++i) at[st[i].get<int64_t>()].push_back(num(x[i]));
  }
  std::vector<int64_t> steps;
  std::vector<double> mean;
  for (auto& [s, xs] : at)
    if (xs.size() == v.runs.size() && spread_of(xs).n == int64_t(xs.size())) {
      steps.push_back(s);
      mean.push_back(spread_of(xs).mean);
    }
  return {steps, mean};
}

// The gnuplot script of the comparison's plots and its data files, written into plots/.
struct PlotScript {
  fs::path plots;
  std::ostringstream gp;
  // Writes plots/<name>.dat and returns its quoted path for the script.
  std::string dat(const std::string& name, const std::string& text) const {
    const auto f = plots / (name + ".dat");
    write_file_atomic(f.string(), text);
    return quote(f.string());
  }
};

// The rows x cols of a grid of n panels.
void grid(size_t n, int& rows, int& cols) {
  cols = n > 4 ? 3 : 2;
  rows = int((n + size_t(cols) - 1) / size_t(cols));
}

// Validation loss vs tokens (mean, min-max band) and training loss (smoothed mean).
void plot_losses(PlotScript& ps, const std::vector<const Variant*>& main) {
  auto& gp = ps.gp;
  const auto& plots = ps.plots;
  auto dat = [&](const std::string& n, const std::string& text) { return ps.dat(n, text); };
  {
    std::string band, line, train;
    for (size_t i = 0; i < main.size(); ++i) {
      const auto c = validation_curve(*main[i]);
      std::ostringstream d;
      for (size_t k = 0; k < c.tokens.size(); ++k)
        d << c.tokens[k] / 1e6 << " " << c.mean[k] << " " << c.lo[k] << " " << c.hi[k] << "\n";
      const auto f = dat("validation_" + main[i]->name, d.str() + "\n");
      const std::string lc = " lc " + std::to_string(i + 1);
      band += std::string(band.empty() ? "" : ", ") + f +
              " using 1:3:4 with filledcurves fs transparent solid 0.15" + lc + " notitle";
      line +=
          ", " + f + " using 1:2 with linespoints lw 2 pt 7 ps 0.6" + lc + " title '" + main[i]->name + "'";
      auto [steps, loss] = mean_curve(*main[i], "loss");
      const auto sm = smooth(loss, std::max<size_t>(1, loss.size() / 40));
      const double tps = num((*main[i]->runs.front())["tokens_per_step"], 0);
      std::ostringstream t;
      for (size_t k = 0; k < steps.size(); ++k) t << double(steps[k]) * tps / 1e6 << " " << sm[k] << "\n";
      train += std::string(train.empty() ? "" : ", ") + dat("train_" + main[i]->name, t.str() + "\n") +
               " using 1:2 with lines lw 2" + lc + " title '" + main[i]->name + "'";
    }
    if (!main.empty())
      gp << "set terminal pngcairo size 1100,900 font 'sans,10'\nset output "
         << quote((plots / "loss.png").string())
         << "\nset multiplot layout 2,1\nset xlabel 'training tokens (millions)'\nset ylabel 'cross-entropy "
            "(nats)'\n"
         << "set title 'Validation loss: mean over seeds, band = min-max'\nplot " << band << line
         << "\nset title 'Training loss: mean over seeds, moving average'\nplot " << train
         << "\nunset multiplot\n";
  }
}

// MaxVio_batch vs steps.
void plot_max_vio(PlotScript& ps, const std::vector<const Variant*>& main) {
  auto& gp = ps.gp;
  const auto& plots = ps.plots;
  auto dat = [&](const std::string& n, const std::string& text) { return ps.dat(n, text); };
  {
    std::string p;
    for (size_t i = 0; i < main.size(); ++i) {
      auto [steps, vio] = mean_curve(*main[i], "max_vio_batch");
      const auto sm = smooth(vio, std::max<size_t>(1, vio.size() / 40));
      std::ostringstream d;
      for (size_t k = 0; k < steps.size(); ++k) d << steps[k] << " " << std::max(sm[k], 1e-4) << "\n";
      p += std::string(p.empty() ? "" : ", ") + dat("max_vio_" + main[i]->name, d.str() + "\n") +
           " using 1:2 with lines lw 2 lc " + std::to_string(i + 1) + " title '" + main[i]->name + "'";
    }
    if (!main.empty())
      gp << "set terminal pngcairo size 1100,550 font 'sans,10'\nset output "
         << quote((plots / "max_vio_batch.png").string())
         << "\nset title 'MaxVio_batch per training step (mean over MoE layers and seeds, moving average); "
            "dashed: "
         << fmt(kBalanced, 1)
         << "' noenhanced\nset xlabel 'step'\nset ylabel 'MaxVio_batch' noenhanced\nset logscale y\n"
         << "plot " << p << ", " << kBalanced
         << " with lines dt 2 lc rgb 'black' notitle\nunset logscale y\n";
  }
}

// Expert load during training, per variant (first seed).
void plot_load_heatmaps(PlotScript& ps, const std::vector<const Variant*>& main) {
  auto& gp = ps.gp;
  const auto& plots = ps.plots;
  auto dat = [&](const std::string& n, const std::string& text) { return ps.dat(n, text); };
  {
    int rows, cols;
    grid(main.size(), rows, cols);
    if (!main.empty()) {
      gp << "set terminal pngcairo size " << 420 * cols << "," << 300 * rows + 40
         << " font 'sans,9'\nset output " << quote((plots / "load_heatmaps.png").string())
         << "\nset multiplot layout " << rows << "," << cols
         << " title 'Expert load during training (load / mean load, both MoE layers summed; first seed)'\n"
         << "unset key\nset xlabel 'training step'\nset ylabel 'expert'\nset cbrange [0:3]\nset palette "
            "rgbformulae 21,22,23\n";
      for (auto* v : main) {
        const json& r = *v->runs.front();
        const auto& steps = r["curve"]["step"];
        const auto& loads = r["load_steps"];
        if (loads.empty()) continue;
        const size_t n = loads.size(), E = loads[0].size();
        const size_t bucket = std::max<size_t>(1, n / 150);
        std::ostringstream d;
        for (size_t b = 0; b * bucket < n; ++b) {
          std::vector<double> acc(E, 0);
          double total = 0;
          for (size_t i = b * bucket; i < std::min(n, (b + 1) * bucket); ++i)
            for (size_t e = 0; e < E; ++e) {
              acc[e] += loads[i][e].get<double>();
              total += loads[i][e].get<double>();
            }
          const double mean = total / double(E);
          const double st = steps[std::min(n - 1, b * bucket)].get<double>();
          for (size_t e = 0; e < E; ++e) d << st << " " << e << " " << (mean > 0 ? acc[e] / mean : 0) << "\n";
          d << "\n";
        }
        gp << "set title '" << v->name << "' noenhanced\nset yrange [-0.5:" << double(E) - 0.5
           << "]\nset xrange [*:*]\nplot " << dat("load_" + v->name, d.str()) << " using 1:2:3 with image\n";
      }
      gp << "unset multiplot\nunset cbrange\nset xrange [*:*]\nset yrange [*:*]\n";
    }
  }
}

// p(expert | genre) on the validation set, per variant (first seed).
void plot_genre_expert(PlotScript& ps, const std::vector<const Variant*>& main) {
  auto& gp = ps.gp;
  const auto& plots = ps.plots;
  auto dat = [&](const std::string& n, const std::string& text) { return ps.dat(n, text); };
  {
    int rows, cols;
    grid(main.size(), rows, cols);
    if (!main.empty()) {
      gp << "set terminal pngcairo size " << 460 * cols << "," << 330 * rows + 40
         << " font 'sans,9'\nset output " << quote((plots / "genre_expert.png").string())
         << "\nset multiplot layout " << rows << "," << cols
         << " title 'p(expert | genre) on the validation set (MoE layers summed; first seed)'\nunset key\n"
         << "set xlabel 'expert'\nset ylabel ''\nset cbrange [0:*]\nset palette rgbformulae 21,22,23\n";
      for (auto* v : main) {
        const json& val = (*v->runs.front())["validation"];
        if (val.is_null() || val["layers"].empty()) continue;
        const auto& domains = val["domains"];
        const size_t D = domains.size();
        const size_t E = val["layers"][0]["load"].size();
        std::vector<std::vector<double>> m(D, std::vector<double>(E, 0));
        for (auto& l : val["layers"])
          for (size_t d = 0; d < D && d < l["domain_expert"].size(); ++d)
            for (size_t e = 0; e < E; ++e) m[d][e] += l["domain_expert"][d][e].get<double>();
        // Genres with no validation tokens (the held-out genre) have no row.
        std::ostringstream d, ytics;
        int rows_drawn = 0;
        for (size_t g = 0; g < D; ++g) {
          double row = 0;
          for (double x : m[g]) row += x;
          if (row <= 0) continue;
          for (size_t e = 0; e < E; ++e) d << e << " " << rows_drawn << " " << m[g][e] / row << "\n";
          d << "\n";
          ytics << (rows_drawn ? ", " : "") << "\"" << domains[g].get<std::string>() << "\" " << rows_drawn;
          ++rows_drawn;
        }
        if (rows_drawn == 0) continue;
        gp << "set ytics (" << ytics.str() << ") noenhanced\nset title '" << v->name
           << "' noenhanced\nset xrange [-0.5:" << double(E) - 0.5
           << "]\nset yrange [-0.5:" << rows_drawn - 0.5 << "]\nplot " << dat("genre_" + v->name, d.str())
           << " using 1:2:3 with image\n";
      }
      gp << "unset multiplot\nset ytics autofreq\nunset cbrange\nset xrange [*:*]\nset yrange [*:*]\n";
    }
  }
}

// Fault injection: the faulty expert's traffic and the loss, each fault run and its fault-free reference.
void plot_fault(PlotScript& ps, const std::vector<Variant>& vs, const std::vector<const Variant*>& faults) {
  auto& gp = ps.gp;
  const auto& plots = ps.plots;
  auto dat = [&](const std::string& n, const std::string& text) { return ps.dat(n, text); };
  std::vector<const Variant*> faulty;
  for (auto* v : faults)
    if (v->role != "fault_reference") faulty.push_back(v);
  if (!faulty.empty()) {
    const Variant* hier = fault_reference(vs);
    std::string share, loss;
    int lc = 1;
    int64_t at = -1;
    auto add = [&](const json& r, const std::string& title, int64_t expert) {
      std::ostringstream ds, dl;
      const auto sh = fault_share(r, expert);
      std::vector<double> raw;
      for (auto& p : sh) raw.push_back(p.second);
      const auto sm = smooth(raw, std::max<size_t>(1, raw.size() / 60));
      for (size_t k = 0; k < sh.size(); ++k) ds << sh[k].first << " " << sm[k] << "\n";
      const auto& st = r["curve"]["step"];
      std::vector<double> l;
      for (auto& x : r["curve"]["loss"]) l.push_back(num(x));
      const auto lsm = smooth(l, std::max<size_t>(1, l.size() / 60));
      for (size_t k = 0; k < st.size(); ++k) dl << st[k].get<int64_t>() << " " << lsm[k] << "\n";
      const std::string tag = title;
      std::string safe = tag;
      for (auto& ch : safe)
        if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
      share += std::string(share.empty() ? "" : ", ") + dat("fault_share_" + safe, ds.str() + "\n") +
               " using 1:2 with lines lw 2 lc " + std::to_string(lc) + " title '" + title + "'";
      loss += std::string(loss.empty() ? "" : ", ") + dat("fault_loss_" + safe, dl.str() + "\n") +
              " using 1:2 with lines lw 2 lc " + std::to_string(lc) + " title '" + title + "'";
      ++lc;
    };
    int64_t expert = 0, seed = -1, last = 0;
    for (auto* v : faulty)
      for (auto* r : v->runs) {
        expert = (*r)["fault"]["expert"].get<int64_t>();
        at = (*r)["fault"]["step"].get<int64_t>();
        seed = (*r)["seed"].get<int64_t>();
        last = std::max<int64_t>(last, (*r)["steps"].get<int64_t>());
        add(*r, v->name + " s" + std::to_string(seed), expert);
      }
    if (hier)
      for (auto* r : hier->runs)
        if ((*r)["seed"].get<int64_t>() == seed)
          add(*r, hier->name + " s" + std::to_string(seed) + " (no fault)", expert);
    gp << "set key outside right noenhanced\nset terminal pngcairo size 1100,850 font 'sans,10'\nset output "
       << quote((plots / "fault.png").string()) << "\nset multiplot layout 2,1\nset xrange [0:" << last
       << "]\nset xlabel 'training step'\n"
       << "set arrow 1 from " << at << ", graph 0 to " << at << ", graph 1 nohead dt 2 lc rgb 'red'\n"
       << "set title 'Faulty expert " << expert
       << "''s share of the load (both MoE layers, moving average); dashed: fault starts'\n"
       << "set ylabel 'share of assignments'\nplot " << share
       << "\nset title 'Training loss (moving average)'\nset ylabel 'cross-entropy (nats)'\nplot " << loss
       << "\nunset multiplot\nunset arrow 1\nset xrange [*:*]\n";
  }
}

// Routing cost vs E.
void plot_routing_cost(PlotScript& ps, const json& result) {
  auto& gp = ps.gp;
  const auto& plots = ps.plots;
  auto dat = [&](const std::string& n, const std::string& text) { return ps.dat(n, text); };
  if (result.contains("routing_scale") && result["routing_scale"].contains("points")) {
    std::ostringstream d;
    for (auto& p : result["routing_scale"]["points"])
      d << p["E"].get<int64_t>() << " " << num(p["topk"]["route_ms"]) << " "
        << num(p["hierarchical"]["route_ms"]) << " " << num(p["topk"]["layer_ms"]) << " "
        << num(p["hierarchical"]["layer_ms"]) << "\n";
    const auto f = dat("routing_scale", d.str());
    gp << "set key outside right noenhanced\nset terminal pngcairo size 1000,500 font 'sans,10'\nset output "
       << quote((plots / "routing_cost.png").string())
       << "\nset title 'Routing cost vs number of experts (median ms; equal compute: K = 2)'\nset logscale "
          "xy\n"
       << "set xlabel 'routed experts E'\nset ylabel 'ms'\nset xtics (16, 32, 64, 128, 256)\nplot " << f
       << " using 1:2 with linespoints lw 2 pt 7 title 'topk route()', " << f
       << " using 1:3 with linespoints lw 2 pt 7 title 'hierarchical route()', " << f
       << " using 1:4 with linespoints lw 2 pt 5 dt 2 title 'topk layer fwd+bwd', " << f
       << " using 1:5 with linespoints lw 2 pt 5 dt 2 title 'hierarchical layer fwd+bwd'\nunset logscale xy\n"
       << "set xtics autofreq\n";
  }
}

// Bars with min-max error bars.
void plot_bars(PlotScript& ps, const std::vector<const Variant*>& main) {
  auto& gp = ps.gp;
  const auto& plots = ps.plots;
  auto dat = [&](const std::string& n, const std::string& text) { return ps.dat(n, text); };
  {
    struct Bar {
      std::string file, title;
      Getter get;
    };
    const std::vector<Bar> bars = {{"ppl_validation", "validation perplexity", kValPpl},
                                   {"ppl_heldout", "held-out genre perplexity", kHeldPpl},
                                   {"max_vio_batch", "MaxVio_batch (mean over steps)", kMaxVioBatch},
                                   {"max_vio_global", "MaxVio_global (validation)", kMaxVioGlobal},
                                   {"specialization", "specialisation I(genre; expert)/H(genre)", kSpec},
                                   {"gap", "optimality gap vs exact balanced optimum", kGap}};
    if (!main.empty()) {
      gp << "set terminal pngcairo size 1300,750 font 'sans,10'\nset output "
         << quote((plots / "bars.png").string())
         << "\nset multiplot layout 2,3 title 'mean over seeds, error bars = min-max'\nunset key\n"
         << "set style data histograms\nset style histogram errorbars gap 1 lw 1\nset style fill solid 0.7 "
            "border -1\n"
         << "set boxwidth 0.8\nset xtics rotate by -30 noenhanced\nset xlabel ''\nset ylabel ''\n";
      for (auto& b : bars) {
        std::ostringstream d;
        double lo = 0, hi = 0;
        for (auto* v : main) {
          const auto s = over(*v, b.get);
          d << v->name << " " << s.mean << " " << s.min << " " << s.max << "\n";
          lo = std::min(lo, s.min);
          hi = std::max(hi, s.max);
        }
        if (hi - lo <= 0) hi = 1;
        const double pad = 0.1 * (hi - lo);
        gp << "set title '" << b.title << "' noenhanced\nset yrange [" << (lo < 0 ? lo - pad : 0.0) << ":"
           << hi + pad << "]\nplot " << dat("bar_" + b.file, d.str()) << " using 2:3:4:xtic(1) lc 3\n";
      }
      gp << "unset multiplot\nset yrange [*:*]\n";
    }
  }
}

void write_plots(const fs::path& dir, const json& result, const std::vector<Variant>& vs) {
  PlotScript ps;
  ps.plots = dir / "plots";
  fs::create_directories(ps.plots);
  std::vector<const Variant*> main, faults;
  for (auto& v : vs) (v.group == "main" ? main : faults).push_back(&v);
  ps.gp << "set grid\nset key outside right noenhanced\n";
  plot_losses(ps, main);
  plot_max_vio(ps, main);
  plot_load_heatmaps(ps, main);
  plot_genre_expert(ps, main);
  plot_fault(ps, vs, faults);
  plot_routing_cost(ps, result);
  plot_bars(ps, main);
  const auto script = ps.plots / "compare.gp";
  write_file_atomic(script.string(), ps.gp.str());
  run_gnuplot(script.string());
}

// The comparison's own resolution: the seed spread of the final validation loss, the smallest paired
// difference its seeds can resolve, and balancing switched off against the balance loss (a difference the
// comparison should be able to see).
void calibration(const std::vector<Variant>& vs, ClaimContext& cx, std::ostream& md) {
  const Variant* bl = by_role(vs, "balance_loss");
  const Variant* off = nullptr;
  for (auto& v : vs)
    if (v.group == "main" && bl && v.name != bl->name && v.router == "topk" && v.role != "balance_loss")
      off = &v;
  if (!bl) {
    md << "No balance-loss variant: nothing to calibrate against.\n\n";
    return;
  }
  const auto sl = over(*bl, kValLoss);
  md << "- seed standard deviation of " << bl->name << "'s final validation loss: " << fmt(sl.sd, 4)
     << " nats over " << sl.n << " seeds\n";
  std::vector<double> sds;
  for (auto& v : vs)
    if (v.group == "main" && v.name != bl->name) {
      const auto p = paired(v, *bl, kValLoss, "validation loss", true);
      if (p.d.n >= 2) sds.push_back(p.d.sd);
    }
  if (!sds.empty()) {
    std::sort(sds.begin(), sds.end());
    const double sd = sds[sds.size() / 2];
    const int n = int(sl.n);
    const double half = n >= 2 ? student_t_quantile(0.975, n - 1) * sd / std::sqrt(double(n)) : NAN;
    md << "- median sd of the per-seed validation-loss differences against " << bl->name << ": " << fmt(sd, 4)
       << " nats; with " << n << " seeds a 95% interval is ±" << fmt(half, 4) << " nats (±"
       << fmt((std::exp(half) - 1) * 100, 1)
       << "% perplexity) wide: a smaller difference cannot be resolved; "
       << "the ±" << fmt(cx.bound * 100, 1) << "% equivalence bound needs about "
       << seeds_for_half_width(sd, std::log1p(cx.bound)) << " seeds at this sd\n";
  }
  if (off) {
    PairedVerdict v;
    md << "- balancing switched off: "
       << equivalence_text(paired(*off, *bl, kValLoss, "validation perplexity", true), cx.bound, &v)
       << "; dead "
       << "experts " << cell(over(*off, kDead), 1) << " vs " << cell(over(*bl, kDead), 1) << "\n";
  }
  md << "\n";
}

// Every paired test of the claims with its two-sided p-value and Holm's family-wise level: the claims'
// verdicts use each test's own 95% interval; the table says which resolutions survive the family.
void multiple_comparisons(const ClaimContext& cx, std::ostream& md) {
  std::vector<const Paired*> ts;
  std::vector<double> ps;
  for (auto& t : cx.tests)
    if (t.d.n >= 2) {
      ts.push_back(&t);
      ps.push_back(paired_p_value(t.d));
    }
  if (ts.empty()) return;
  const auto levels = holm_levels(ps, 0.05);
  md << "## Multiple comparisons\n\n"
     << "The claims above read each test's own 95% interval. Across the " << ts.size()
     << " paired tests of this report, Holm's step-down procedure at a family-wise 5% (the k-th smallest "
        "p-value tested at 0.05 / (m − k + 1)) keeps these resolutions of a difference from 0 (a paired t "
        "test; equivalence verdicts are not in this table):\n\n"
     << "| test | mean difference | p | Holm level | resolved from 0 in the family "
        "|\n|---|---|---|---|---|\n";
  for (size_t i = 0; i < ts.size(); ++i)
    md << "| " << ts[i]->what << " | " << signed_value(ts[i]->d.mean, *ts[i], 4) << " | " << fmt(ps[i], 4)
       << " | " << (levels[i] > 0 ? fmt(levels[i], 4) : std::string("— (stopped)")) << " | "
       << (ps[i] <= levels[i] && levels[i] > 0 ? "yes" : "no") << " |\n";
  md << "\n";
}

// claims.json: each claim's verdict and evidence, and every paired test with its per-seed pairs, mean,
// sd, 95% t interval, p-value and Holm level (the numbers report.md prints, for a reader's own analysis).
json claims_json(const std::vector<Claim>& claims, const ClaimContext& cx) {
  json out = {{"equivalence_ppl", cx.bound},
              {"interval", "95% Student-t on the per-seed differences x − ref"},
              {"multiple_comparisons", "Holm step-down at a family-wise 5% over the tests with >= 2 seeds"},
              {"claims", json::array()},
              {"tests", json::array()}};
  for (auto& c : claims)
    out["claims"].push_back({{"title", c.title}, {"verdict", c.verdict}, {"evidence", c.evidence}});
  std::vector<double> ps;
  for (auto& t : cx.tests)
    if (t.d.n >= 2) ps.push_back(paired_p_value(t.d));
  const auto levels = holm_levels(ps, 0.05);
  size_t k = 0;
  const auto finite = [](double v) { return std::isfinite(v) ? json(v) : json(nullptr); };
  for (auto& t : cx.tests) {
    json pairs = json::array();
    for (size_t i = 0; i < t.seeds.size(); ++i)
      pairs.push_back({{"seed", t.seeds[i]}, {"ref", t.ref_values[i]}, {"x", t.x_values[i]}});
    json j = {{"test", t.what},       {"pairs", pairs},
              {"n", t.d.n},           {"mean", t.d.mean},
              {"sd", finite(t.d.sd)}, {"lo", finite(t.d.lo)},
              {"hi", finite(t.d.hi)}, {"perplexity_ratio", t.log_ratio}};
    if (t.d.n >= 2) {
      j["p"] = ps[k];
      j["holm_level"] = levels[k];
      j["resolved_in_family"] = levels[k] > 0 && ps[k] <= levels[k];
      ++k;
    }
    out["tests"].push_back(j);
  }
  return out;
}

}  // namespace

std::string write_compare_outputs(const std::string& out_dir, const json& result, bool plots) {
  const fs::path dir(out_dir);
  if (!result.is_object() || !result.contains("runs") || !result.contains("variants"))
    throw FileError((dir / "compare.json").string(), "not a comparison's JSON (no runs / variants)");
  const auto vs = collect(result);
  if (plots) write_plots(dir, result, vs);
  std::ostringstream md;
  md << "# Router comparison\n\n"
     << "Every variant trains the same model shape on the same data for the same steps, with the same active "
        "expert "
        "compute per token (K = "
     << result["k"].get<int64_t>()
     << " expert assignments per token on average; the measured figure is in the table), once per seed. "
        "Figures "
        "are mean ± sample standard deviation [min–max] over seeds. Claims compare variants by their "
        "per-seed "
        "difference (a seed fixes the data order and the initialisation of every variant): its mean and 95% "
        "Student-t interval. A direction is resolved when the interval excludes 0; an \"equal or better\" "
        "perplexity is judged against the equivalence bound below, fixed before the run; anything else is "
        "\"not resolved\", with the interval it reached (docs/comparison.md, \"Paired statistics\").\n\n"
     << "| | |\n|---|---|\n"
     << "| command | `" << result["command"].get<std::string>() << "` |\n"
     << "| config | " << result.value("source", std::string("-")) << " |\n"
     << "| machine | " << result["machine"].get<std::string>() << " |\n"
     << "| steps x batch x sequence | " << result["steps"].get<int64_t>() << " x "
     << result["batch_size"].get<int64_t>() << " x " << result["seq_len"].get<int64_t>() << " ("
     << fmt(double(result["steps"].get<int64_t>() * result["batch_size"].get<int64_t>() *
                   result["seq_len"].get<int64_t>()) /
                1e6,
            2)
     << "M training tokens per run) |\n"
     << "| seeds | " << result["seeds"].dump() << " |\n"
     << "| equivalence bound | ±" << fmt(100.0 * result.value("equivalence_ppl", 0.01), 1) << "% perplexity"
     << (result.contains("equivalence_ppl")
             ? " (compare.equivalence_ppl)"
             : " (the default: this comparison's JSON predates compare.equivalence_ppl)")
     << " |\n"
     << "| time | " << format_duration(result.value("seconds_total", 0.0))
     << " in all (every call of the command) |\n";
  if (!result.value("complete", false)) md << "| state | **incomplete**: rerun the command to finish |\n";
  {
    // Runs taken from an earlier comparison (--reuse): how many, from where, and the config keys moeforge
    // gained since they ran (at their defaults here, which is what those runs did).
    std::set<std::string> keys;
    size_t n = 0;
    for (auto& r : result["runs"])
      if (r.contains("reused")) {
        ++n;
        for (auto& k : r["reused"]["keys_added"]) {
          const auto text = k.get<std::string>();
          keys.insert(text.substr(0, text.find(" = ")));
        }
      }
    if (n > 0) {
      std::string ks;
      for (auto& k : keys) ks += (ks.empty() ? "`" : ", `") + k + "`";
      md << "| reused runs | " << n << " of " << result["runs"].size()
         << " runs were taken from an earlier comparison (--reuse) made with the same config before these "
            "keys existed: "
         << (ks.empty() ? std::string("none") : ks) << " |\n";
    }
  }
  md << "\n## Variants and equal compute\n\n"
     << "| variant | router | seeds | overrides | equal-compute setting | assignments/token (training) | "
        "assignments/token (validation) | dropped share | tokens without an expert (validation) | training "
        "tokens/s (bench) |\n"
     << "|---|---|---|---|---|---|---|---|---|---|\n";
  for (auto& v : vs) {
    std::string over_s;
    for (auto& r : result["variants"])
      if (r["name"] == v.name)
        for (auto& o : r["overrides"])
          over_s += (over_s.empty() ? "" : ", ") + ("`" + o.get<std::string>() + "`");
    const std::string setting = v.role == "dense_active" ? "dense: one FFN, the active parameters of top-K"
                                : v.role == "dense_total"
                                    ? "dense: one FFN, the total parameters of the experts"
                                    : v.equal_compute;
    const auto unrouted = over(v, kUnroutedEval);
    md << "| " << v.name << " | " << (*v.runs.front())["router_label"].get<std::string>() << " | "
       << v.runs.size() << " | " << (over_s.empty() ? "-" : over_s) << " | " << setting << " | "
       << cell(over(v, kAptTrain), 3) << " | " << cell(over(v, kAptEval), 3) << " | "
       << cell(over(v, kDropped), 4) << " | "
       << (unrouted.n > 0 ? cell(unrouted, 4) : std::string("- (not measured by these runs)")) << " | "
       << fmt(throughput_of(result, v.name), 0) << " |\n";
  }
  md << "\n## Results\n\n"
     << "| variant | val ppl | held-out ppl | MaxVio_batch | MaxVio_batch (last tenth) | MaxVio_global | "
        "time "
        "to balance (steps) | dead experts | specialisation | opt. gap | causal leak eval / train (max) |\n"
     << "|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (auto& v : vs) {
    if (v.group != "main") continue;
    const auto le = over(v, kLeakEval), lt = over(v, kLeakTrain);
    std::ostringstream leak;
    leak << std::scientific << std::setprecision(1) << le.max << " / " << lt.max;
    md << "| " << v.name << " | " << cell(over(v, kValPpl), 2) << " | " << cell(over(v, kHeldPpl), 2) << " | "
       << cell(over(v, kMaxVioBatch), 3) << " | " << cell(over(v, kLateVio), 3) << " | "
       << cell(over(v, kMaxVioGlobal), 3) << " | " << cell(over(v, kTimeToBalance), 0) << " | "
       << cell(over(v, kDead), 1) << " | " << cell(over(v, kSpec), 3) << " | " << cell(over(v, kGap), 4)
       << " | " << leak.str() << " |\n";
  }
  md << "\nMaxVio_batch: (max load − mean load) / mean load of each training batch, mean over MoE layers, "
        "then "
        "over steps (the whole run, and the last tenth of the steps: the steady state). MaxVio_global: the "
        "same "
        "over the summed validation loads. Time to balance: the first "
        "logged step from which MaxVio_batch, as a moving average over "
     << kBalanceWindow << " logged steps, stays under " << fmt(kBalanced, 1)
     << " to the end (\"never\": not under it at the end; 0.5 because random top-2 routing of a 2,048-token "
        "batch over 16 experts already has MaxVio_batch ~0.11 and balanced routers end at 0.2-0.3). Dead "
        "experts: experts (over MoE layers) with "
        "under "
        "1% of the mean validation load. Specialisation: I(genre; expert) / H(genre) on the validation set. "
        "Optimality gap: (Σ s·x_opt − Σ s·x_router) / Σ s·x_opt on the first validation sequences, x_opt the "
        "exact balanced optimum (GLPK), s the router's own probabilities; negative when the router overfills "
        "capacity. Causal leak: max |y' − y| of a MoE layer's output at positions ≤ S/2 when later positions "
        "are replaced (0 = causal; values under 1e-5 are float32 noise of recomputing the layer). Training "
        "tokens/s: one interleaved run of every variant's training step in one process (`moeforge bench`), "
        "not wall clock.\n\n";
  ClaimContext cx;
  cx.bound = result.value("equivalence_ppl", 0.01);
  md << "## Calibration: what this comparison can resolve\n\n";
  calibration(vs, cx, md);
  md << "## The claims\n\n";
  const auto claims = answer_claims(vs, result, cx);
  for (auto& c : claims) {
    md << "### " << c.title << "\n\n**" << c.verdict << "**\n\n";
    for (auto& e : c.evidence) md << "- " << e << "\n";
    md << "\n";
  }
  multiple_comparisons(cx, md);
  write_file_atomic((dir / "claims.json").string(), claims_json(claims, cx).dump(1) + "\n");
  md << "Every paired test above with its per-seed pairs, interval, p-value and Holm level: "
        "`claims.json`.\n\n";
  if (result.contains("throughput") && result["throughput"].contains("machine"))
    md << "Throughput measured on: " << result["throughput"]["machine"].get<std::string>() << "; "
       << result["throughput"].value("steps", 0) << " interleaved steps per variant, median.\n\n";
  if (plots) {
    md << "## Plots\n\n![loss](plots/loss.png)\n\n![MaxVio_batch](plots/max_vio_batch.png)\n\n"
       << "![measures](plots/bars.png)\n\n![load heatmaps](plots/load_heatmaps.png)\n\n"
       << "![genre x expert](plots/genre_expert.png)\n\n";
    if (fs::exists(dir / "plots" / "fault.png")) md << "![fault injection](plots/fault.png)\n\n";
    if (fs::exists(dir / "plots" / "routing_cost.png"))
      md << "![routing cost vs E](plots/routing_cost.png)\n\n";
  }
  md << "Each run's own report, metrics and checkpoint: `<variant>/seed<k>/` (not committed).\n";
  const auto path = (dir / "report.md").string();
  write_file_atomic(path, md.str());
  return path;
}

}  // namespace moeforge
