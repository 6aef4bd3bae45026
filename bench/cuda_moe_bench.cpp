// cuda_moe_bench: the CUDA MoE forward (kernels/cuda/moe_layer.h) against a dense bf16 FFN over the same
// number of rows and against a plain per-expert loop, on GPU. No LibTorch; needs a CUDA device (without
// one it says so and exits 0). Not a test.
//
// Variants, all bf16 storage with float32 accumulation, timed with CUDA events on one stream:
//   moe       moe_forward: router GEMM, top-K softmax, counting sort, one D2H copy of the expert offsets
//             and its synchronisation, gather, grouped GEMMs (cublasGemmGroupedBatchedEx when it applies),
//             SwiGLU, grouped GEMM, gather-form combine
//   moe_loop  the same with MoeConfig::grouped_gemm = false: one cublasGemmEx per expert and product
//   route     moe_route alone (router GEMM + top-K + sort + the offsets' copy and sync), for the breakdown
//   dense     a dense SwiGLU FFN on N = T * K rows: three cublasGemmEx ([N, C] x [F, C]^T twice, then
//             [N, F] x [C, F]^T) and the SwiGLU kernel; the same FLOPs as the experts, with no routing
//   loop      the "plain loop" a framework-level implementation does: the same routing (moe_route), then per
//             expert with rows: gather its rows, three GEMMs, SwiGLU, atomic scatter-add, and a stream
//             synchronisation per expert, as index_select / mm loops that read sizes on the host pay
// Per round the variants run in a rotating order (A B C D, then B C D A, ...); each run is preceded by a
// write of --flush-mib MiB (default 256, above the L2 size) outside the timed region, so no variant finds
// the weights of the previous one in L2. Reported: the median over --reps rounds after --warmup rounds.
// dense_ratio = t_dense / t_moe (above 1: the MoE forward is faster than the dense FFN of the same rows);
// loop_speedup = t_loop / t_moe.
//
// Routing: uniform (random router weights: loads near T K / E) or skewed (a constant input feature with
// router weights -1.5 log(e + 1) on it, so expert e's load falls off like a Zipf law); the measured
// max_load / mean_load is reported.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/cuda/grouped_gemm.h"
#include "kernels/cuda/moe_layer.h"
#include "kernels/cuda/moe_ops.h"

// cublas_v2.h only for the handle's lifetime; every product goes through kernels/cuda.
#include <cublas_v2.h>

namespace {

namespace kc = moeforge::kernels::cuda;
using kc::bf16;
using kc::DType;

[[noreturn]] void die(const std::string& what, int rc) {
  std::fprintf(stderr, "cuda_moe_bench: %s failed: %s (%d)\n", what.c_str(), kc::error_string(rc), rc);
  std::exit(1);
}

#define CHECK(expr)                         \
  do {                                      \
    const int rc_ = static_cast<int>(expr); \
    if (rc_ != 0) die(#expr, rc_);          \
  } while (0)

bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}
float to_float(bf16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A device allocation freed on scope exit.
class Dev {
 public:
  explicit Dev(size_t bytes) : bytes_(bytes) {
    if (bytes_) CHECK(cudaMalloc(&p_, bytes_));
  }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  ~Dev() {
    if (p_) cudaFree(p_);
  }
  void* get() const { return p_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_;
  void* p_ = nullptr;
};

// n bf16 values, uniform with standard deviation `scale`, uploaded.
void fill_uniform(Dev& d, int64_t n, float scale, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-scale * std::sqrt(3.0f), scale * std::sqrt(3.0f));
  std::vector<bf16> h(n);
  for (auto& v : h) v = to_bf16(u(rng));
  CHECK(cudaMemcpy(d.get(), h.data(), sizeof(bf16) * n, cudaMemcpyHostToDevice));
}

struct Shape {
  std::string name;
  int64_t T, C, F, E, K;
};

struct Options {
  std::string json;
  int reps = 30, warmup = 5;
  int64_t flush_mib = 256;
  std::vector<std::string> shapes;  // empty: all
  std::vector<std::string> routings = {"uniform", "skewed"};
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

struct Result {
  Shape shape;
  std::string routing;
  double max_over_mean_load = 0, max_rel_diff_loop = 0;
  int64_t empty_experts = 0;
  std::vector<std::pair<std::string, double>> ms;  // variant -> median ms
  double get(const std::string& v) const {
    for (const auto& [k, x] : ms)
      if (k == v) return x;
    return 0;
  }
};

Result run_case(const Shape& s, const std::string& routing, const Options& opt, void* cublas,
                cudaStream_t stream, Dev& flush) {
  const int64_t T = s.T, C = s.C, F = s.F, E = s.E, K = s.K, N = T * K;
  std::mt19937 rng(1234);
  Dev x(sizeof(bf16) * T * C), router(sizeof(bf16) * E * C), wg(sizeof(bf16) * E * F * C),
      wu(sizeof(bf16) * E * F * C), wd(sizeof(bf16) * E * C * F), y(sizeof(bf16) * T * C),
      y_loop(sizeof(bf16) * T * C);
  fill_uniform(x, T * C, 1.0f, rng);
  fill_uniform(router, E * C, 1.0f / std::sqrt(float(C)), rng);
  fill_uniform(wg, E * F * C, 1.0f / std::sqrt(float(C)), rng);
  fill_uniform(wu, E * F * C, 1.0f / std::sqrt(float(C)), rng);
  fill_uniform(wd, E * C * F, 1.0f / std::sqrt(float(F)), rng);
  if (routing == "skewed") {
    // Feature 0 of every token is 1; expert e's router weight on it is -1.5 log(e + 1).
    std::vector<bf16> one(T, to_bf16(1.0f));
    CHECK(cudaMemcpy2D(x.get(), sizeof(bf16) * C, one.data(), sizeof(bf16), sizeof(bf16), T,
                       cudaMemcpyHostToDevice));
    std::vector<bf16> bias(E);
    for (int64_t e = 0; e < E; ++e) bias[e] = to_bf16(-1.5f * std::log(float(e + 1)));
    CHECK(cudaMemcpy2D(router.get(), sizeof(bf16) * C, bias.data(), sizeof(bf16), sizeof(bf16), E,
                       cudaMemcpyHostToDevice));
  }

  kc::MoeConfig cfg;
  cfg.T = T, cfg.C = C, cfg.F = F, cfg.E = E, cfg.K = K, cfg.dtype = DType::kBFloat16;
  cfg.renormalize = true, cfg.grouped_gemm = true, cfg.deterministic_combine = true;
  kc::MoeConfig cfg_loopgemm = cfg;
  cfg_loopgemm.grouped_gemm = false;
  const kc::MoeWeights w{router.get(), wg.get(), wu.get(), wd.get()};
  Dev work(kc::moe_workspace_bytes(cfg)), work_loop(kc::moe_workspace_bytes(cfg));
  int64_t* host_off = nullptr;  // pinned: the one D2H copy per forward is a real async copy
  CHECK(cudaMallocHost(&host_off, sizeof(int64_t) * 2 * (E + 1)));
  kc::MoeWorkspace ws, ws_loop;
  CHECK(kc::moe_workspace_carve(cfg, work.get(), work.bytes(), host_off, &ws));
  CHECK(kc::moe_workspace_carve(cfg, work_loop.get(), work_loop.bytes(), host_off + E + 1, &ws_loop));
  Dev acc(sizeof(float) * T * C);

  // Dense FFN over N rows: weights of one expert's shape.
  Dev xd(sizeof(bf16) * N * C), d1(sizeof(bf16) * F * C), d2(sizeof(bf16) * F * C), d3(sizeof(bf16) * C * F),
      da(sizeof(bf16) * N * F), db(sizeof(bf16) * N * F), dy(sizeof(bf16) * N * C);
  fill_uniform(xd, N * C, 1.0f, rng);
  fill_uniform(d1, F * C, 1.0f / std::sqrt(float(C)), rng);
  fill_uniform(d2, F * C, 1.0f / std::sqrt(float(C)), rng);
  fill_uniform(d3, C * F, 1.0f / std::sqrt(float(F)), rng);

  const auto bf = DType::kBFloat16;
  std::vector<std::pair<std::string, std::function<void()>>> variants = {
      {"moe", [&] { CHECK(kc::moe_forward(cfg, w, x.get(), y.get(), ws, cublas, stream)); }},
      {"moe_loop", [&] { CHECK(kc::moe_forward(cfg_loopgemm, w, x.get(), y.get(), ws, cublas, stream)); }},
      {"route", [&] { CHECK(kc::moe_route(cfg, w, x.get(), ws, cublas, stream)); }},
      {"dense",
       [&] {
         CHECK(kc::gemm(cublas, bf, bf, false, true, N, F, C, xd.get(), d1.get(), da.get(), false, stream));
         CHECK(kc::gemm(cublas, bf, bf, false, true, N, F, C, xd.get(), d2.get(), db.get(), false, stream));
         CHECK(kc::swiglu_forward(da.as<bf16>(), da.as<bf16>(), db.as<bf16>(), nullptr, N, F, stream));
         CHECK(kc::gemm(cublas, bf, bf, false, true, N, C, F, da.get(), d3.get(), dy.get(), false, stream));
       }},
      {"loop",
       [&] {
         CHECK(kc::moe_route(cfg, w, x.get(), ws_loop, cublas, stream));
         CHECK(cudaMemsetAsync(acc.get(), 0, sizeof(float) * T * C, stream));
         const int64_t* off = ws_loop.host_offsets;
         auto* rows = static_cast<bf16*>(ws_loop.rows_c1);
         auto* a = static_cast<bf16*>(ws_loop.a);
         auto* b = static_cast<bf16*>(ws_loop.b);
         auto* out = static_cast<bf16*>(ws_loop.rows_c2);
         const auto* pwg = static_cast<const bf16*>(w.w_gate);
         const auto* pwu = static_cast<const bf16*>(w.w_up);
         const auto* pwd = static_cast<const bf16*>(w.w_down);
         for (int64_t e = 0; e < E; ++e) {
           const int64_t r0 = off[e], n = off[e + 1] - off[e];
           if (n == 0) continue;
           CHECK(kc::gather_rows(rows, x.as<bf16>(), ws_loop.token_index + r0, n, C, stream));
           CHECK(kc::gemm(cublas, bf, bf, false, true, n, F, C, rows, pwg + e * F * C, a, false, stream));
           CHECK(kc::gemm(cublas, bf, bf, false, true, n, F, C, rows, pwu + e * F * C, b, false, stream));
           CHECK(kc::swiglu_forward(a, a, b, ws_loop.gate_rows + r0, n, F, stream));
           CHECK(kc::gemm(cublas, bf, bf, false, true, n, C, F, a, pwd + e * C * F, out, false, stream));
           CHECK(
               kc::scatter_add_gated(acc.as<float>(), out, ws_loop.token_index + r0, nullptr, n, C, stream));
           CHECK(cudaStreamSynchronize(stream));  // the host-side size read of a framework loop
         }
         CHECK(kc::convert(y_loop.as<bf16>(), acc.as<float>(), T * C, stream));
       }},
  };

  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  std::vector<std::vector<double>> times(variants.size());
  const int rounds = opt.warmup + opt.reps;
  for (int r = 0; r < rounds; ++r)
    for (size_t i = 0; i < variants.size(); ++i) {
      const size_t v = (i + static_cast<size_t>(r)) % variants.size();
      if (flush.bytes()) CHECK(cudaMemsetAsync(flush.get(), r & 0xff, flush.bytes(), stream));
      CHECK(cudaEventRecord(start, stream));
      variants[v].second();
      CHECK(cudaEventRecord(stop, stream));
      CHECK(cudaEventSynchronize(stop));
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      if (r >= opt.warmup) times[v].push_back(ms);
    }
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));

  Result res;
  res.shape = s;
  res.routing = routing;
  for (size_t v = 0; v < variants.size(); ++v) res.ms.push_back({variants[v].first, median(times[v])});
  // Loads of the last routing, and the loop's output against the driver's (same routing, other summation
  // order and rounding points: a sanity check of the measured code, not a test).
  std::vector<int64_t> off(host_off, host_off + E + 1);
  int64_t mx = 0;
  for (int64_t e = 0; e < E; ++e) {
    mx = std::max(mx, off[e + 1] - off[e]);
    res.empty_experts += off[e + 1] == off[e];
  }
  res.max_over_mean_load = N > 0 ? double(mx) / (double(N) / double(E)) : 0.0;
  CHECK(kc::moe_forward(cfg, w, x.get(), y.get(), ws, cublas, stream));
  CHECK(cudaStreamSynchronize(stream));
  std::vector<bf16> h1(T * C), h2(T * C);
  CHECK(cudaMemcpy(h1.data(), y.get(), sizeof(bf16) * T * C, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(h2.data(), y_loop.get(), sizeof(bf16) * T * C, cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (int64_t i = 0; i < T * C; ++i) {
    num = std::max(num, double(std::fabs(to_float(h1[i]) - to_float(h2[i]))));
    den = std::max(den, double(std::fabs(to_float(h1[i]))));
  }
  res.max_rel_diff_loop = den > 0 ? num / den : num;
  CHECK(cudaFreeHost(host_off));
  return res;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

void usage() {
  std::printf(
      "usage: cuda_moe_bench [--json PATH] [--reps N (30)] [--warmup N (5)] [--flush-mib N (256, 0: off)]\n"
      "                      [--shapes top2,fine,top2-decode-T1,...] [--routing uniform,skewed]\n");
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        usage();
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--json")
      opt.json = next();
    else if (a == "--reps")
      opt.reps = std::max(1, std::atoi(next().c_str()));
    else if (a == "--warmup")
      opt.warmup = std::max(0, std::atoi(next().c_str()));
    else if (a == "--flush-mib")
      opt.flush_mib = std::max(0, std::atoi(next().c_str()));
    else if (a == "--shapes")
      opt.shapes = split(next());
    else if (a == "--routing")
      opt.routings = split(next());
    else if (a == "--help" || a == "-h") {
      usage();
      return 0;
    } else {
      usage();
      return 2;
    }
  }

  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::printf("no CUDA device: nothing measured\n");
    return 0;
  }

  std::vector<Shape> shapes = {{"top2", 4096, 512, 1024, 16, 2}, {"fine", 4096, 512, 256, 64, 8}};
  for (const int64_t t : {1, 4, 16}) {
    shapes.push_back({"top2-decode-T" + std::to_string(t), t, 512, 1024, 16, 2});
    shapes.push_back({"fine-decode-T" + std::to_string(t), t, 512, 256, 64, 8});
  }
  if (!opt.shapes.empty()) {
    std::vector<Shape> keep;
    for (const auto& s : shapes)
      if (std::find(opt.shapes.begin(), opt.shapes.end(), s.name) != opt.shapes.end()) keep.push_back(s);
    shapes = keep;
  }

  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  int runtime = 0;
  CHECK(cudaRuntimeGetVersion(&runtime));
  cublasHandle_t handle = nullptr;
  if (const cublasStatus_t st = cublasCreate(&handle); st != CUBLAS_STATUS_SUCCESS)
    die("cublasCreate", kc::kCublasErrorBase + static_cast<int>(st));
  int cublas_version = 0;
  cublasGetVersion(handle, &cublas_version);
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Dev flush(static_cast<size_t>(opt.flush_mib) << 20);

  std::printf(
      "device %s, CUDA runtime %d, cuBLAS %d, grouped GEMM %s; bf16, median of %d (warm-up %d), L2 flush "
      "%lld MiB\n",
      prop.name, runtime, cublas_version, kc::grouped_gemm_native() ? "cublasGemmGroupedBatchedEx" : "loop",
      opt.reps, opt.warmup, static_cast<long long>(opt.flush_mib));
  std::printf("%-16s %-8s %9s %6s %9s %9s %9s %9s %9s %11s %12s %9s\n", "shape", "routing", "max/mean",
              "empty", "moe_ms", "moe_loop", "route_ms", "dense_ms", "loop_ms", "dense_ratio", "loop_speedup",
              "loop_diff");
  std::vector<Result> results;
  for (const auto& s : shapes)
    for (const auto& r : opt.routings) {
      const Result res = run_case(s, r, opt, handle, stream, flush);
      const double moe = res.get("moe");
      std::printf("%-16s %-8s %9.2f %6lld %9.4f %9.4f %9.4f %9.4f %9.4f %11.3f %12.2f %9.2e\n",
                  s.name.c_str(), r.c_str(), res.max_over_mean_load,
                  static_cast<long long>(res.empty_experts), moe, res.get("moe_loop"), res.get("route"),
                  res.get("dense"), res.get("loop"), moe > 0 ? res.get("dense") / moe : 0.0,
                  moe > 0 ? res.get("loop") / moe : 0.0, res.max_rel_diff_loop);
      std::fflush(stdout);
      results.push_back(res);
    }

  if (!opt.json.empty()) {
    std::ofstream f(opt.json);
    f << "{\n  \"device\": \"" << prop.name << "\",\n  \"cuda_runtime\": " << runtime
      << ",\n  \"cublas\": " << cublas_version
      << ",\n  \"grouped_gemm_native\": " << (kc::grouped_gemm_native() ? "true" : "false")
      << ",\n  \"dtype\": \"bf16\",\n  \"reps\": " << opt.reps << ",\n  \"warmup\": " << opt.warmup
      << ",\n  \"flush_mib\": " << opt.flush_mib << ",\n  \"results\": [\n";
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      const double moe = r.get("moe");
      f << "    {\"shape\": \"" << r.shape.name << "\", \"routing\": \"" << r.routing
        << "\", \"T\": " << r.shape.T << ", \"C\": " << r.shape.C << ", \"F\": " << r.shape.F
        << ", \"E\": " << r.shape.E << ", \"K\": " << r.shape.K
        << ", \"max_over_mean_load\": " << r.max_over_mean_load << ", \"empty_experts\": " << r.empty_experts;
      for (const auto& [k, v] : r.ms) f << ", \"" << k << "_ms\": " << v;
      f << ", \"dense_ratio\": " << (moe > 0 ? r.get("dense") / moe : 0.0)
        << ", \"loop_speedup\": " << (moe > 0 ? r.get("loop") / moe : 0.0)
        << ", \"max_rel_diff_moe_vs_loop\": " << r.max_rel_diff_loop << "}"
        << (i + 1 < results.size() ? "," : "") << "\n";
    }
    f << "  ]\n}\n";
    if (!f) {
      std::fprintf(stderr, "cuda_moe_bench: could not write %s\n", opt.json.c_str());
      return 1;
    }
    std::printf("wrote %s\n", opt.json.c_str());
  }
  cudaStreamDestroy(stream);
  cublasDestroy(handle);
  return 0;
}
