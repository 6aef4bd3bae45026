// moeforge info: the machine line of bench and reports, the CPU's vector features, OpenBLAS's core, the
// tokenizer module, and optionally the sgemm rate (docs/performance.md).
#include <torch/torch.h>

#include <iostream>

#include "bench/timing.h"
#include "cli_util.h"
#include "command.h"
#include "moeforge/data/tokenizer_module.h"
#include "moeforge/util/error.h"
#include "moeforge/util/runtime.h"

namespace moeforge::cli {

namespace {

void print_cpu() {
  const CpuFeatures f = read_cpu_features();
  std::cout << "machine: " << describe_machine() << "\n"
            << "cpu: " << (f.vendor.empty() ? "unknown vendor" : f.vendor);
  for (const auto& [name, has] : {std::pair{"avx", f.avx},
                                  {"avx2", f.avx2},
                                  {"fma", f.fma},
                                  {"avx512f", f.avx512f},
                                  {"avx512bw", f.avx512bw},
                                  {"avx512dq", f.avx512dq},
                                  {"avx512vl", f.avx512vl},
                                  {"os-avx", f.os_avx},
                                  {"os-avx512", f.os_avx512}})
    if (has) std::cout << " " << name;
  const std::string core = openblas_core();
  std::cout << " (vector level " << cpu_vector_level(f) << ")\n"
            << "openblas core: " << (core.empty() ? "none" : core) << " (vector level "
            << blas_core_level(core) << ")\n";
  const std::string bf16 = bf16_support(f);
  std::cout << "bf16: "
            << (bf16.empty()
                    ? "none (no AVX512-BF16 or AMX-BF16 the OS enables: a bf16 GEMM converts to float32)"
                    : bf16 + " (native bf16 products with float32 accumulation)")
            << "\n";
}

// sgemm and LibTorch's bf16 matrix product (oneDNN where the CPU has bf16 instructions) timed in one run,
// interleaved, so that their ratio is of the same machine state (docs/performance.md, "bf16 on this CPU").
void print_sgemm(int64_t n, int reps) {
  auto a = torch::randn({n, n}), b = torch::randn({n, n});
  auto c = torch::empty({n, n});
  auto ab = a.to(torch::kBFloat16), bb = b.to(torch::kBFloat16);
  auto cb = torch::empty({n, n}, torch::kBFloat16);
  auto t = bench::interleaved(
      {{"sgemm", [&] { at::mm_out(c, a, b); }}, {"bf16", [&] { at::mm_out(cb, ab, bb); }}}, reps);
  const double flop = 2.0 * double(n) * double(n) * double(n);
  auto rate = [&](const char* k) { return flop / (t[k].median() * 1e-3) * 1e-9; };
  std::cout << "sgemm " << n << "^3: " << fixed(rate("sgemm"), 1) << " GFLOP/s (median of " << reps << ", "
            << fixed(t["sgemm"].min(), 1) << "-" << fixed(t["sgemm"].max(), 1) << " ms)\n"
            << "bf16 gemm " << n << "^3: " << fixed(rate("bf16"), 1) << " GFLOP/s (median of " << reps << ", "
            << fixed(t["bf16"].min(), 1) << "-" << fixed(t["bf16"].max(), 1) << " ms; "
            << fixed(rate("bf16") / rate("sgemm"), 2) << "x sgemm)\n";
}

}  // namespace

Command add_info(CLI::App& app, const Globals& /*g*/) {
  struct Args {
    int64_t sgemm = 0;
    int reps = 5;
  };
  auto a = std::make_shared<Args>();
  auto* c = app.add_subcommand(
      "info", "the machine line of bench and reports, the CPU's vector features and OpenBLAS's core");
  c->add_option("--sgemm", a->sgemm, "also time an N x N x N float matrix product (e.g. 2048)")
      ->check(CLI::Range(int64_t(1), int64_t(16384)));
  c->add_option("--reps", a->reps, "with --sgemm: timed repetitions (median reported)")
      ->check(CLI::Range(1, 1000));
  return {c, [a, c] {
            if (c->count("--reps") > 0 && a->sgemm == 0)
              throw ConfigError("--reps", "applies only with --sgemm");
            print_cpu();
            // Which SentencePiece module a moved or installed binary found (docs/interop.md).
            try {
              std::cout << "tokenizer module: " << tokenizer_module_path() << "\n";
            } catch (const std::exception& e) {
              std::cout << "tokenizer module: none loads: " << e.what() << "\n";
            }
            if (a->sgemm > 0) print_sgemm(a->sgemm, a->reps);
            return 0;
          }};
}

}  // namespace moeforge::cli
