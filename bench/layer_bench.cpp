#include "layer_bench.h"

#include "timing.h"

#include <torch/torch.h>

#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <map>
#include <sstream>

#include "moeforge/layer/dispatch.h"
#include "moeforge/layer/experts.h"
#include "moeforge/layer/moe_layer.h"
#include "moeforge/routing/registry.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/gnuplot.h"
#include "moeforge/util/runtime.h"

namespace moeforge {

std::vector<BenchShape> default_bench_shapes() {
  return {
      {"top2", 4096, 512, 1024, 16, 2},
      {"fine_grained", 4096, 512, 256, 64, 8},
      {"decode_t1", 1, 512, 1024, 16, 2},
      {"decode_t4", 4, 512, 1024, 16, 2},
      {"decode_t16", 16, 512, 1024, 16, 2},
      {"top2_gelu", 4096, 512, 2048, 16, 2, ExpertAct::kGELU, /*by_default=*/false},
  };
}

namespace {

using bench::interleaved;

// Skewed routing: a constant input channel and router weights on it equal to s * log(1/(e+1)) multiply
// every token's router probabilities by a Zipf prior (e+1)^-s on top of its own scores. s = 1 gave
// MaxVio ~6-7 (nearly everything on the first experts); s = 0.15 gives MaxVio ~1 at E=16, K=2 and ~2 at
// E=64, K=8: a realistic imbalance for a router that is not yet balanced.
constexpr double kSkewZipfExponent = 0.15;

void make_skewed(torch::Tensor& x, Router& router) {
  torch::NoGradGuard ng;
  x.select(1, 0).fill_(1.0);
  auto* w = router.named_parameters(/*recurse=*/false).find("weight");  // the [E, C] router projection
  TORCH_CHECK(w != nullptr, "bench: skewed routing needs a router with a [E, C] \"weight\"");
  const int64_t E = w->size(0);
  auto prior = torch::arange(1, E + 1, torch::kFloat).reciprocal().log() * kSkewZipfExponent;
  w->select(1, 0).copy_(prior);
}

// A field of /proc/self/status in kB ("VmRSS", "VmHWM"), or -1.
int64_t proc_status_kb(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1));
  return -1;
}

// Peak resident memory (MiB) that one call of fn adds to what the process holds before it: free heap is
// returned to the system (malloc_trim), the kernel's high-water mark is reset (writing 5 to
// /proc/self/clear_refs, Linux >= 4.0), and the mark after the call is compared with the resident size
// before it. Negative when the mark cannot be reset.
double peak_rss_mib(const std::function<void()>& fn) {
  malloc_trim(0);
  {
    std::ofstream clear("/proc/self/clear_refs");
    clear << "5";
    if (!clear.good()) return -1;
  }
  const int64_t base = proc_status_kb("VmRSS");
  fn();
  const int64_t hwm = proc_status_kb("VmHWM");
  if (base < 0 || hwm < 0) return -1;
  return double(hwm - base) / 1024.0;
}

// Drops every gradient, so that a memory pass allocates its gradients like a first training step.
void drop_grads(torch::nn::Module& m) {
  for (auto& p : m.parameters()) p.mutable_grad() = torch::Tensor();
}

// One training step of a layer alone: forward of x [B, S, C], backward of gy, the router's after_step.
void layer_train_step(MoELayer& l, const torch::Tensor& x, const torch::Tensor& gy) {
  auto xg = x.clone().requires_grad_();
  l->forward(xg).y.backward(gy);
  l->zero_grad();
  l->after_step();
}

// The router's route() alone, in training mode, on x [B, S, C].
void route_only(MoELayer& l, const torch::Tensor& x) {
  torch::NoGradGuard ng;
  RouteContext ctx;
  ctx.n_seq = x.size(0);
  ctx.seq_len = x.size(1);
  ctx.training = true;
  l->router->route(x.reshape({-1, x.size(2)}), ctx);
}

}  // namespace

// Each router's cost on the top-2 shape (T = 4096 as 32 sequences of 128, C = 512, F = 1024, 16 experts, two
// active per token) against the topk router, interleaved in one run: the whole layer forward+backward in
// training mode, and the router's route() alone. Active compute is equalised: expert choice takes CF = K,
// hierarchical 1 of 4 clusters x top-2 inside it, MoCE top-2 inside the sequence's group of 4.
nlohmann::json bench_router_costs(const LayerBenchOptions& opt, std::ostream& log) {
  const auto shape = default_bench_shapes().front();  // top2
  const int64_t S = 128, B = shape.T / S;
  const std::string baseline = "topk";
  auto make_cfg = [&](const std::string& router) {
    MoEConfig c;
    c.router = router;
    c.n_expert = shape.E;
    c.n_expert_used = shape.K;
    c.d_expert = shape.F;
    c.n_cluster = 4;
    router_spec(router).equal_compute(c);  // the registry's equal-compute setting (routing/registry.h)
    return c;
  };
  torch::manual_seed(1);
  MoELayer base(make_cfg(baseline), shape.C);
  base->train();
  auto x = torch::randn({B, S, shape.C});
  auto gy = torch::randn({B, S, shape.C});
  nlohmann::json out = nlohmann::json::array();
  log << "\nrouter cost on the top2 shape, ratio to topk (> 1 = slower), median of " << opt.reps << "\n";
  for (const auto& name : router_names()) {
    if (name == baseline) continue;
    MoELayer layer(make_cfg(name), shape.C);
    layer->train();
    auto t = interleaved({{"topk_layer", [&] { layer_train_step(base, x, gy); }},
                          {"router_layer", [&] { layer_train_step(layer, x, gy); }},
                          {"topk_route", [&] { route_only(base, x); }},
                          {"router_route", [&] { route_only(layer, x); }}},
                         opt.reps);
    const double layer_ratio = t["router_layer"].median() / t["topk_layer"].median();
    const double route_ratio = t["router_route"].median() / t["topk_route"].median();
    out.push_back({{"router", name},
                   {"layer_fwd_bwd_ms", t["router_layer"].median()},
                   {"topk_layer_fwd_bwd_ms", t["topk_layer"].median()},
                   {"layer_ratio", layer_ratio},
                   {"route_ms", t["router_route"].median()},
                   {"topk_route_ms", t["topk_route"].median()},
                   {"route_ratio", route_ratio}});
    log << "  " << std::left << std::setw(14) << name << std::right << std::fixed << std::setprecision(3)
        << "layer fwd+bwd " << std::setw(7) << layer_ratio << "  (" << std::setprecision(1)
        << t["router_layer"].median() << " vs " << t["topk_layer"].median() << " ms)   route() "
        << std::setprecision(3) << std::setw(7) << route_ratio << "  (" << std::setprecision(2)
        << t["router_route"].median() << " vs " << t["topk_route"].median() << " ms)" << std::endl;
  }
  return out;
}

nlohmann::json run_routing_scale(const std::vector<int64_t>& experts, int reps, std::ostream& log) {
  const int64_t S = 128, B = 16, C = 128, F = 172, K = 2;
  torch::manual_seed(1);
  auto x = torch::randn({B, S, C});
  auto gy = torch::randn({B, S, C});
  nlohmann::json points = nlohmann::json::array();
  log << "\nrouting cost vs E (T = " << B * S << ", C = " << C << ", F = " << F << ", K = " << K
      << "), median of " << reps << " ms\n";
  for (const int64_t E : experts) {
    int64_t G = 1;
    while (G * G * 4 <= E) G *= 2;  // G = sqrt(E) for E = 4^k, the power of two below otherwise
    auto make = [&](const std::string& router) {
      MoEConfig c;
      c.router = router;
      c.n_expert = E;
      c.n_expert_used = K;
      c.d_expert = F;
      c.n_cluster = G;
      router_spec(router).equal_compute(c);  // hierarchical: 1 cluster x top-2 (routing/registry.h)
      MoELayer l(c, C);
      l->train();
      return l;
    };
    MoELayer flat = make("topk"), hier = make("hierarchical");
    auto t = interleaved({{"topk_layer", [&] { layer_train_step(flat, x, gy); }},
                          {"hier_layer", [&] { layer_train_step(hier, x, gy); }},
                          {"topk_route", [&] { route_only(flat, x); }},
                          {"hier_route", [&] { route_only(hier, x); }}},
                         reps);
    points.push_back(
        {{"E", E},
         {"G", G},
         {"topk", {{"route_ms", t["topk_route"].median()}, {"layer_ms", t["topk_layer"].median()}}},
         {"hierarchical", {{"route_ms", t["hier_route"].median()}, {"layer_ms", t["hier_layer"].median()}}}});
    log << "  E = " << std::setw(4) << E << " (G = " << std::setw(2) << G << "): route() topk " << std::fixed
        << std::setprecision(3) << t["topk_route"].median() << " ms, hierarchical "
        << t["hier_route"].median() << " ms; layer fwd+bwd topk " << std::setprecision(1)
        << t["topk_layer"].median() << " ms, hierarchical " << t["hier_layer"].median() << " ms" << std::endl;
  }
  return {
      {"machine", describe_machine()}, {"reps", reps}, {"T", B * S}, {"C", C}, {"F", F}, {"points", points}};
}

namespace {

// Least-squares slope of log(y) against log(x): the exponent a of y ~ x^a.
double loglog_slope(const std::vector<double>& x, const std::vector<double>& y) {
  const size_t n = x.size();
  if (n < 2) return std::nan("");
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (size_t i = 0; i < n; ++i) {
    const double lx = std::log(x[i]), ly = std::log(y[i]);
    sx += lx;
    sy += ly;
    sxx += lx * lx;
    sxy += lx * ly;
  }
  const double den = double(n) * sxx - sx * sx;
  return den == 0 ? std::nan("") : (double(n) * sxy - sx * sy) / den;
}

}  // namespace

nlohmann::json run_scaling_bench(int reps, bool quick, std::ostream& log) {
  const int64_t C = 256, F = 256, S = 128, T0 = 4096, E0 = 32, K0 = 2;
  const std::vector<std::pair<std::string, std::vector<int64_t>>> sweeps = {
      {"T", {1024, 2048, 4096, 8192, 16384}}, {"E", {8, 16, 32, 64, 128, 256}}, {"K", {1, 2, 4, 8}}};
  nlohmann::json out = {{"machine", describe_machine()},
                        {"reps", reps},
                        {"base", {{"T", T0}, {"E", E0}, {"K", K0}, {"C", C}, {"F", F}, {"seq_len", S}}},
                        {"sweeps", nlohmann::json::object()}};
  log << "scaling: top-K softmax MoE layer, C = " << C << ", F = " << F << ", base T = " << T0
      << ", E = " << E0 << ", K = " << K0 << "; median of " << reps << " (ms)\n";
  torch::manual_seed(2);
  for (const auto& [var, values] : sweeps) {
    nlohmann::json points = nlohmann::json::array();
    std::vector<double> xs, layer_ms, route_ms;
    const size_t n = quick ? std::min<size_t>(2, values.size()) : values.size();
    for (size_t i = 0; i < n; ++i) {
      const int64_t v = values[i];
      const int64_t T = var == "T" ? v : T0, E = var == "E" ? v : E0, K = var == "K" ? v : K0;
      MoEConfig c;
      c.router = "topk";
      c.n_expert = E;
      c.n_expert_used = K;
      c.d_expert = F;
      c.capacity_factor = 0;
      MoELayer layer(c, C);
      layer->train();
      auto x = torch::randn({T / S, S, C});
      auto gy = torch::randn({T / S, S, C});
      auto t = interleaved(
          {{"layer", [&] { layer_train_step(layer, x, gy); }}, {"route", [&] { route_only(layer, x); }}},
          reps);
      xs.push_back(double(v));
      layer_ms.push_back(t["layer"].median());
      route_ms.push_back(t["route"].median());
      points.push_back({{"x", v},
                        {"T", T},
                        {"E", E},
                        {"K", K},
                        {"assignments", T * K},
                        {"layer_ms", layer_ms.back()},
                        {"route_ms", route_ms.back()}});
      log << "  " << var << " = " << std::setw(5) << v << ": layer fwd+bwd " << std::fixed
          << std::setprecision(1) << std::setw(8) << layer_ms.back() << " ms, route() "
          << std::setprecision(3) << std::setw(7) << route_ms.back() << " ms" << std::endl;
    }
    const double a_layer = loglog_slope(xs, layer_ms), a_route = loglog_slope(xs, route_ms);
    log << "  fitted growth: layer ~ " << var << "^" << std::setprecision(2) << a_layer << ", route() ~ "
        << var << "^" << a_route << "\n";
    out["sweeps"][var] = {{"points", points}, {"layer_exponent", a_layer}, {"route_exponent", a_route}};
  }
  return out;
}

void plot_scaling_bench(const nlohmann::json& result, const std::string& png) {
  const std::filesystem::path p(png);
  const std::filesystem::path dir = p.parent_path().empty() ? std::filesystem::path(".") : p.parent_path();
  std::filesystem::create_directories(dir);
  const std::string stem = p.stem().string();
  std::ostringstream gp;
  // noenhanced: the machine line's underscores and the exponents' carets are text, not sub/superscripts.
  gp << "set terminal pngcairo noenhanced size 1500,520 font ',10'\nset output '" << png << "'\n"
     << "set multiplot layout 1,3 title \"MoE layer (fwd+bwd) and router (route()) time as T, E, K grow\\n"
     << result["machine"].get<std::string>() << "\"\n"
     << "set logscale xy\nset grid\nset key top left\nset ylabel 'ms (median)'\nset offsets graph 0.05, "
        "graph 0.05\n";
  for (const std::string var : {"T", "E", "K"}) {
    if (!result["sweeps"].contains(var)) continue;
    const auto& sw = result["sweeps"][var];
    const std::filesystem::path dat = dir / (stem + "_" + var + ".dat");
    std::ostringstream d;
    for (const auto& pt : sw["points"])
      d << pt["x"].get<int64_t>() << " " << pt["layer_ms"].get<double>() << " "
        << pt["route_ms"].get<double>() << "\n";
    write_file_atomic(dat.string(), d.str());
    auto exp_str = [&](const char* key) {
      std::ostringstream o;
      o << std::fixed << std::setprecision(2) << sw[key].get<double>();
      return o.str();
    };
    gp << "set xlabel '" << var << "'\nset title 'vs " << var << "'\n"
       << "plot '" << dat.string() << "' using 1:2 with linespoints lw 2 title 'layer ~ " << var << "^"
       << exp_str("layer_exponent") << "', '' using 1:3 with linespoints lw 2 title 'route() ~ " << var << "^"
       << exp_str("route_exponent") << "'\n";
  }
  gp << "unset multiplot\n";
  const auto script = dir / (stem + ".gp");
  write_file_atomic(script.string(), gp.str());
  run_gnuplot(script.string());
}

nlohmann::json run_layer_bench(const LayerBenchOptions& opt, std::ostream& log) {
  torch::manual_seed(0);
  nlohmann::json results = nlohmann::json::array();
  log << std::left << std::setw(14) << "shape" << std::setw(9) << "routing" << std::setw(8) << "router"
      << std::setw(18) << "direction" << std::right << std::setw(10) << "moe_ms" << std::setw(10)
      << "dense_ms" << std::setw(10) << "loop_ms" << std::setw(12) << "dense_ratio" << std::setw(13)
      << "loop_speedup" << std::setw(9) << "maxvio" << std::setw(10) << "moe_MiB" << std::setw(10)
      << "loop_MiB"
      << "\n";
  for (const auto& shape : default_bench_shapes()) {
    if (opt.shapes.empty() ? !shape.by_default
                           : std::find(opt.shapes.begin(), opt.shapes.end(), shape.name) == opt.shapes.end())
      continue;
    for (const auto& routing : opt.routings) {
      MoEConfig cfg;
      cfg.router = "topk";
      cfg.n_expert = shape.E;
      cfg.n_expert_used = shape.K;
      cfg.d_expert = shape.F;
      cfg.expert_act = shape.act;
      cfg.capacity_factor = 0;  // dropless
      MoELayer layer(cfg, shape.C);
      auto x = torch::randn({shape.T, shape.C});
      if (routing == "skewed") make_skewed(x, *layer->router);
      auto weights = layer->experts->weights();

      RoutingPlan plan0;
      {
        torch::NoGradGuard ng;
        plan0 = layer->router->route(x, {});
      }
      const int64_t N = plan0.n_assign();
      // The dense side: one FFN of the same expert shape over the same N rows.
      DenseFFN dense(shape.C, shape.F, shape.act);
      auto x_dense = torch::randn({N, shape.C});
      const bool swiglu = shape.act == ExpertAct::kSwiGLU;
      ExpertWeights dense_w{shape.act, swiglu ? dense->w_gate.unsqueeze(0) : torch::Tensor(),
                            dense->w_up.unsqueeze(0), dense->w_down.unsqueeze(0)};
      const std::vector<int64_t> dense_off = {0, N};
      Workspace dense_ws;  // moeforge's own kernels on the dense side get the same buffer reuse

      for (const auto& direction : opt.directions) {
        const bool backward = direction == "forward_backward";
        // Forward alone is inference: the layer in eval mode (as generate() runs it); with backward it
        // trains. The plain loop routes with the default context (not training) either way.
        layer->train(backward);
        auto gy_tok = torch::randn({shape.T, shape.C});
        auto gy_rows = torch::randn({N, shape.C});
        auto run = [&](const std::function<torch::Tensor()>& f, const torch::Tensor& gy) {
          if (!backward) {
            torch::NoGradGuard ng;
            f();
            return;
          }
          auto xin = f();
          xin.backward(gy);
        };
        auto xg = x.clone().requires_grad_(backward);
        auto xdg = x_dense.clone().requires_grad_(backward);
        auto timings = interleaved(
            {
                {"moe", [&] { run([&] { return layer->forward(xg).y; }, gy_tok); }},
                {"dense_torch", [&] { run([&] { return dense->forward(xdg); }, gy_rows); }},
                {"dense_own",
                 [&] { run([&] { return experts_grouped(xdg, dense_off, dense_w, &dense_ws); }, gy_rows); }},
                {"loop",
                 [&] {
                   run(
                       [&] {
                         auto plan = layer->router->route(xg, {});
                         return moe_plain_loop(xg, plan, weights);
                       },
                       gy_tok);
                 }},
            },
            opt.reps);
        // Memory passes, one call each after the timed ones: the MoE layer starts without its workspace,
        // so its buffers are counted; both start without gradients.
        auto run_moe = [&] { run([&] { return layer->forward(xg).y; }, gy_tok); };
        auto run_loop = [&] {
          run(
              [&] {
                auto plan = layer->router->route(xg, {});
                return moe_plain_loop(xg, plan, weights);
              },
              gy_tok);
        };
        drop_grads(*layer);
        xg.mutable_grad() = torch::Tensor();
        const double loop_peak = peak_rss_mib(run_loop);
        drop_grads(*layer);
        xg.mutable_grad() = torch::Tensor();
        layer->experts->workspace().clear();
        const double moe_peak = peak_rss_mib(run_moe);
        drop_grads(*layer);
        dense->zero_grad();
        const double moe_ms = timings["moe"].median();
        const double dense_ms = std::min(timings["dense_torch"].median(), timings["dense_own"].median());
        const double loop_ms = timings["loop"].median();
        nlohmann::json r = {
            {"shape", shape.name},
            {"T", shape.T},
            {"C", shape.C},
            {"F", shape.F},
            {"E", shape.E},
            {"K", shape.K},
            {"expert_act", to_string(shape.act)},
            {"routing", routing},
            {"router", "topk"},
            {"direction", direction},
            {"n_assign", N},
            {"max_vio", plan0.stats.max_vio},
            {"moe_ms", moe_ms},
            {"dense_ms", dense_ms},
            {"dense_torch_ms", timings["dense_torch"].median()},
            {"dense_own_ms", timings["dense_own"].median()},
            {"loop_ms", loop_ms},
            {"dense_ratio", dense_ms / moe_ms},
            {"loop_speedup", loop_ms / moe_ms},
            {"moe_ms_range", {timings["moe"].min(), timings["moe"].max()}},
            {"dense_ms_range",
             {std::min(timings["dense_torch"].min(), timings["dense_own"].min()),
              std::min(timings["dense_torch"].max(), timings["dense_own"].max())}},
            {"loop_ms_range", {timings["loop"].min(), timings["loop"].max()}},
            {"reps", opt.reps},
            {"skew_zipf_exponent", routing == "skewed" ? kSkewZipfExponent : 0.0},
            {"moe_peak_mib", moe_peak},
            {"loop_peak_mib", loop_peak},
        };
        results.push_back(r);
        log << std::left << std::setw(14) << shape.name << std::setw(9) << routing << std::setw(8) << "topk"
            << std::setw(18) << direction << std::right << std::fixed << std::setprecision(2) << std::setw(10)
            << moe_ms << std::setw(10) << dense_ms << std::setw(10) << loop_ms << std::setprecision(3)
            << std::setw(12) << dense_ms / moe_ms << std::setw(13) << loop_ms / moe_ms << std::setw(9)
            << plan0.stats.max_vio << std::setprecision(1) << std::setw(10) << moe_peak << std::setw(10)
            << loop_peak << std::endl;
      }
    }
  }
  nlohmann::json router_costs = nlohmann::json::array();
  const bool top2_selected =
      opt.shapes.empty() || std::find(opt.shapes.begin(), opt.shapes.end(), "top2") != opt.shapes.end();
  if (opt.router_costs && top2_selected) router_costs = bench_router_costs(opt, log);
  return {{"machine", describe_machine()},
          {"router_costs", router_costs},
          {"memory_method",
           "peak RSS above the resident size before one call (malloc_trim, then VmHWM reset via "
           "/proc/self/clear_refs), one call per variant after the timed ones; MoE workspace cleared first"},
          {"results", results}};
}

}  // namespace moeforge
