// Inference with bf16-stored weights (model/inference_precision.h; docs/performance.md, "bf16 inference"):
// linear_mp and the fused experts with bf16 weights against float64 references of the same bf16 values
// within stated bounds, at decode sizes (small_mm_nt_bf16) and prefill sizes (LibTorch's bf16 product);
// which weights a model stores in bf16; a whole model's logits and greedy tokens beside float32's; the
// --dtype checks; checkpoints refusing bf16 weights.
#include <cmath>
#include <filesystem>

#include "moeforge/config/run_config.h"
#include "moeforge/layer/dispatch.h"
#include "moeforge/layer/fused_moe.h"
#include "moeforge/layer/moe_layer.h"
#include "moeforge/layer/precision.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/generate.h"
#include "moeforge/model/inference_precision.h"
#include "moeforge/model/load.h"
#include "moeforge/routing/registry.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

constexpr auto kB16 = torch::kBFloat16;

// float64 values of a tensor rounded to bf16 (the operands a bf16 product really multiplies).
torch::Tensor bf16_values(const torch::Tensor& t) {
  return t.to(kB16).to(torch::kDouble);
}

// Rows of up to 16 take small_mm_nt_bf16: each product of two bf16 values is exact in float32, only the
// float32 sums round, so the error is below I * eps_f32 * sum|x_i w_i| per output (the classic bound; the
// output is not rounded to bf16). More rows take LibTorch's bf16 product, whose output oneDNN rounds to
// bf16: bf16's unit roundoff u = 2^-8 (8 significant bits) of |x w| on top; the bias is added in float32.
TEST(Bf16Inference, StoredLinearMatchesFloat64OfTheBf16Operands) {
  torch::manual_seed(3);
  const int64_t I = 200, O = 150;  // 200 = 3 x 64 + 8: the kernel's masked tail
  auto w16 = torch::randn({O, I}).to(kB16);
  auto bias = torch::randn({O});
  for (int64_t rows : {1, 2, 5, 16, 17, 64}) {
    SCOPED_TRACE("rows=" + std::to_string(rows));
    auto x = torch::randn({rows, I});
    auto y = linear_mp(x, w16, bias);
    ASSERT_EQ(y.scalar_type(), torch::kFloat);
    const auto xd = bf16_values(x), wd = w16.to(torch::kDouble);
    const auto ref = torch::addmm(bias.to(torch::kDouble), xd, wd.t());
    const auto mag = torch::mm(xd.abs(), wd.abs().t());
    const double eps = std::numeric_limits<float>::epsilon();
    auto bound = mag * (double(I) * eps) + 1e-5;  // + the bias's float32 add (|y| < 100)
    if (rows > 16) bound = bound + (ref - bias.to(torch::kDouble)).abs() * (1.0 / 256);  // bf16's u = 2^-8
    const auto err = (y.to(torch::kDouble) - ref).abs();
    EXPECT_TRUE((err <= bound).all().item<bool>()) << "max error " << err.max().item<double>();
    if (rows > 16) continue;
    // And it is bf16 arithmetic: float32 products of the unrounded x differ by far more than the bound.
    const auto fp32 = torch::addmm(bias.to(torch::kDouble), x.to(torch::kDouble), wd.t());
    EXPECT_GT((fp32 - ref).abs().max().item<double>(), 10 * bound.max().item<double>());
  }
  // Leading dimensions are kept: [B, S, I] -> [B, S, O].
  EXPECT_EQ(linear_mp(torch::randn({2, 3, I}), w16).sizes(), (std::vector<int64_t>{2, 3, O}));
}

// float32 weights at decode take the same small-GEMM path (small_mm_nt) instead of BLAS, which packs the
// whole weight for one row: against float64, the classic summation bound; with gradients asked for, the
// autograd product (whose gradient reaches x).
TEST(DecodeProducts, FewRowsOfFloat32MatchFloat64) {
  torch::manual_seed(5);
  const int64_t I = 200, O = 150;
  auto w = torch::randn({O, I}), bias = torch::randn({O});
  for (int64_t rows : {1, 3, 16}) {
    SCOPED_TRACE("rows=" + std::to_string(rows));
    auto x = torch::randn({rows, I});
    torch::Tensor y;
    {
      torch::NoGradGuard ng;
      y = linear_mp(x, w, bias);
    }
    const auto xd = x.to(torch::kDouble), wd = w.to(torch::kDouble);
    const auto ref = torch::addmm(bias.to(torch::kDouble), xd, wd.t());
    const auto bound =
        torch::mm(xd.abs(), wd.abs().t()) * (double(I) * std::numeric_limits<float>::epsilon()) + 1e-5;
    const auto err = (y.to(torch::kDouble) - ref).abs();
    EXPECT_TRUE((err <= bound).all().item<bool>()) << "max error " << err.max().item<double>();
    auto xg = x.clone().requires_grad_();
    linear_mp(xg, w, bias).sum().backward();
    ASSERT_TRUE(xg.grad().defined());
    EXPECT_TENSOR_NEAR(xg.grad(), w.sum(0).expand({rows, I}), 1e-4, 1e-5);
  }
}

// The experts with bf16-stored weights, fused (small groups through small_mm_nt_bf16 at decode, oneDNN's
// padded products at prefill) and the plain loop (linear_mp), against float64 of the same bf16 weights:
// each expert rounds its input and its hidden activation to bf16 (u = 2^-9 each), so the Frobenius error is
// a few u; bound 8u as for bf16 training (test_bf16.cpp), and above u / 64 (it really rounds).
TEST(Bf16Inference, StoredExpertsMatchFloat64WithinBf16Bounds) {
  const int64_t C = 64, F = 96, E = 8, K = 2;
  torch::manual_seed(4);
  auto wg = (torch::randn({E, F, C}) / 8).to(kB16), wu = (torch::randn({E, F, C}) / 8).to(kB16);
  auto wd = (torch::randn({E, C, F}) / 10).to(kB16);
  const ExpertWeights w16{ExpertAct::kSwiGLU, wg, wu, wd};
  const ExpertWeights w64{ExpertAct::kSwiGLU, wg.to(torch::kDouble), wu.to(torch::kDouble),
                          wd.to(torch::kDouble)};
  for (int64_t T : {1, 3, 300}) {
    SCOPED_TRACE("T=" + std::to_string(T));
    auto x = torch::randn({T, C});
    auto experts = torch::multinomial(torch::ones({T, E}), K, false);
    auto gate = torch::rand({T, K}).add_(0.1);
    auto plan = build_plan_from_choices(experts, {}, {}, gate, E, 0);
    const auto ref = moe_plain_loop(x.to(torch::kDouble), plan, w64);
    torch::NoGradGuard ng;
    ASSERT_TRUE(fused_moe_supported(x, w16));
    const auto fused = fused_moe(x, plan, w16, nullptr), plain = moe_plain_loop(x, plan, w16);
    for (const auto& [name, y] : {std::pair{"fused", fused}, std::pair{"plain", plain}}) {
      const double e = ((y.to(torch::kDouble) - ref).norm() / ref.norm()).item<double>();
      EXPECT_LT(e, 1.0 / 64) << name;
      EXPECT_GT(e, 1.0 / 512 / 64) << name << ": no bf16 rounding seen";
    }
  }
  // With gradients asked for, bf16-stored weights are not the fused path's (they are inference-only).
  auto x = torch::randn({4, C});
  EXPECT_FALSE(fused_moe_supported(x, w16));
}

ModelConfig tiny_model() {
  ModelConfig m;
  m.vocab_size = 97;
  m.d_model = 64;
  m.n_head = 4;
  m.n_layer = 3;
  m.d_ff = 96;
  m.moe_every = 2;  // layer 0 dense, layer 1 MoE, layer 2 dense
  m.max_seq_len = 48;
  m.tie_embeddings = false;
  return m;
}

MoEConfig tiny_moe() {
  MoEConfig moe;
  moe.n_expert = 6;
  moe.n_expert_used = 2;
  moe.d_expert = 48;
  moe.n_shared_expert = 1;
  return moe;
}

// A model stored in bf16: the matrix weights (embedding, head, attention, dense FFNs, routed and shared
// experts) in bf16, the router and norms in float32, nothing asks for gradients; its logits stay within a
// few bf16 units of the float32 model's, its greedy decode (KV cache, one row at a time: small_mm_nt_bf16)
// agrees with its own full forward, and a checkpoint of its weights is refused.
TEST(Bf16Inference, ModelStoredInBf16StaysCloseToFloat32) {
  torch::manual_seed(6);
  TransformerLM ref(tiny_model(), tiny_moe()), model(tiny_model(), tiny_moe());
  ref->eval();
  model->eval();
  load_module_state(*model, module_state(*ref), "the float32 model");
  const auto stored = store_weights_bf16(*model);
  int64_t total = 0;
  for (const auto& p : model->named_parameters()) {
    total += p.value().numel();
    EXPECT_FALSE(p.value().requires_grad()) << p.key();
    const bool matrix =
        p.key() == "embedding" || p.key() == "head" || p.key().find(".w_") != std::string::npos;
    EXPECT_EQ(p.value().scalar_type(), matrix ? kB16 : torch::kFloat) << p.key();
  }
  EXPECT_EQ(stored.bf16_params + stored.fp32_params, total);
  EXPECT_GT(stored.bf16_params, 20 * stored.fp32_params);

  auto tokens = torch::randint(0, 97, {2, 40}, torch::kLong);
  torch::NoGradGuard ng;
  const auto y32 = ref->forward(tokens).logits, y16 = model->forward(tokens).logits;
  ASSERT_EQ(y16.scalar_type(), torch::kFloat);
  const double e = ((y16 - y32).norm() / y32.norm()).item<double>();
  EXPECT_LT(e, 1.0 / 32) << "three layers of bf16 rounding";
  EXPECT_GT(e, 1e-5) << "no bf16 rounding seen";

  GenerateOptions g;
  g.temperature = 0;
  g.max_tokens = 12;
  const std::vector<int64_t> prompt = {1, 5, 9, 2};
  const auto out = generate(model, prompt, g);
  ASSERT_EQ(out.size(), 12u);
  // Each greedy token is the argmax of a full forward of everything before it, up to near-ties: a token
  // whose two best logits are within bf16's rounding of each other may go either way between the two paths.
  std::vector<int64_t> seq = prompt;
  for (int64_t t : out) {
    auto logits = model->forward(torch::tensor(seq, torch::kLong).unsqueeze(0)).logits[0][-1];
    const auto top = logits.topk(2);
    const double gap = (std::get<0>(top)[0] - std::get<0>(top)[1]).item<double>();
    if (gap > 0.05) {
      EXPECT_EQ(t, std::get<1>(top)[0].item<int64_t>()) << "after " << seq.size() << " tokens";
    }
    seq.push_back(t);
  }

  Checkpoint ckpt;
  ckpt.model = module_state(*model);
  const auto dir = fs::path(::testing::TempDir()) / "moeforge_bf16_inference_ckpt";
  try {
    save_checkpoint(dir.string(), ckpt);
    ADD_FAILURE() << "a checkpoint of bf16 weights was written";
  } catch (const std::invalid_argument& err) {
    EXPECT_NE(std::string(err.what()).find("float32 master weights"), std::string::npos) << err.what();
  }
  EXPECT_FALSE(fs::exists(dir));
}

// Every router, each with its float32 router weights and state, and the adapter form, on bf16-stored weights:
// the logits stay within bf16's rounding of the float32 model's (two MoE layers; a token near a tie may take
// another expert set, so the bound is on the whole tensor, as above), and greedy decode runs.
TEST(Bf16Inference, EveryRouterRunsOnBf16Weights) {
  std::vector<std::vector<std::string>> cases;
  for (const auto& router : router_names()) cases.push_back({"moe.router=\"" + router + "\""});
  cases.push_back({"moe.expert_form=\"adapter\""});  // the frozen FFN in bf16, the adapters float32
  for (const auto& sets : cases) {
    SCOPED_TRACE(sets.front());
    auto cfg = load_run_config_text("", "test", test::tiny_run_overrides("bf16inf", sets));
    torch::manual_seed(7);
    auto ref = build_model(cfg, 97);
    auto model = build_model(cfg, 97);
    ref->eval();
    model->eval();
    load_module_state(*model, module_state(*ref), "the float32 model");
    store_weights_bf16(*model);
    auto tokens = torch::randint(0, 97, {3, 16}, torch::kLong);
    torch::NoGradGuard ng;
    const auto y32 = ref->forward(tokens).logits, y16 = model->forward(tokens).logits;
    const double e = ((y16 - y32).norm() / y32.norm()).item<double>();
    EXPECT_LT(e, 1.0 / 32);
    EXPECT_GT(e, 1e-5) << "no bf16 rounding seen";
    GenerateOptions g;
    g.temperature = 0;
    g.max_tokens = 6;
    EXPECT_EQ(generate(model, {1, 4, 8}, g).size(), 6u);
  }
}

TEST(Bf16Inference, DtypeChecks) {
  CpuFeatures none, avx512;
  avx512.avx512f = avx512.os_avx512 = avx512.avx512_bf16 = true;
  test::expect_config_error([&] { inference_precision("bf17", "fp32", avx512, "--dtype"); }, "--dtype");
  // Without native bf16 products: a clear error naming the flag, not a silent slowdown.
  test::expect_config_error([&] { inference_precision("bf16", "fp32", none, "--dtype"); }, "--dtype");
  test::expect_config_error([&] { inference_precision("auto", "bf16", none, "--dtype"); }, "--dtype");
  std::string line;
  EXPECT_EQ(inference_precision("bf16", "fp32", avx512, "--dtype", &line), MatmulPrecision::kBFloat16);
  EXPECT_NE(line.find("AVX512-BF16"), std::string::npos) << line;
  EXPECT_EQ(inference_precision("auto", "bf16", avx512, "--dtype"), MatmulPrecision::kBFloat16);
  EXPECT_EQ(inference_precision("auto", "fp32", none, "--dtype"), MatmulPrecision::kFloat32);
  EXPECT_EQ(inference_precision("fp32", "bf16", none, "--dtype"), MatmulPrecision::kFloat32);
}

}  // namespace
}  // namespace moeforge
