// GGUF export checked by llama.cpp itself: node-llama-cpp 3.21.1's prebuilt CPU binary (installed by
// scripts/install-node-llama-cpp.sh) runs the exported file of a tiny model trained here through the CLI,
// and its log-probabilities at every position and its greedy continuation must equal moeforge's.
// Negative controls show that the Q/K permutation and the gate renormalisation are what makes them agree.
// docs/interop.md describes the conversions and the measured agreement.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "interop_util.h"
#include "moeforge/interop/export.h"
#include "moeforge/interop/gguf.h"
#include "moeforge/interop/mixtral.h"
#include "moeforge/model/generate.h"
#include "moeforge/model/inference_precision.h"
#include "moeforge/model/load.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/error.h"

namespace fs = std::filesystem;
using namespace moeforge;

namespace {

using test::fresh_dir;
using test::quote;
using test::run_capture;
using test::train_cli;

struct NodeLlama {
  std::string node, modules;
  bool ok = false;
};

// Where scripts/install-node-llama-cpp.sh put node-llama-cpp (and which node runs it).
NodeLlama node_llama() {
  NodeLlama n;
  const fs::path dir = fs::path(MOEFORGE_SOURCE_DIR) / ".cache" / "node-llama-cpp";
  std::ifstream in(dir / "node-path");
  if (!in || !std::getline(in, n.node)) return n;
  n.modules = (dir / "node_modules").string();
  n.ok = fs::exists(dir / "node_modules" / "node-llama-cpp");
  return n;
}

nlohmann::json run_llama(const nlohmann::json& request, const std::string& dir) {
  const auto nl = node_llama();
  if (!nl.ok)
    throw std::runtime_error(
        "node-llama-cpp is not installed: run scripts/install-node-llama-cpp.sh (make deps does)");
  const std::string req = dir + "/request.json";
  std::ofstream(req) << request.dump();
  int rc = 0;
  const std::string script = std::string(MOEFORGE_SOURCE_DIR) + "/scripts/interop/llamacpp_eval.mjs";
  const std::string out =
      run_capture(quote(nl.node) + " " + quote(script) + " " + quote(nl.modules) + " " + quote(req), &rc);
  if (rc != 0) throw std::runtime_error("llamacpp_eval.mjs failed (exit " + std::to_string(rc) + "): " + out);
  return nlohmann::json::parse(out);
}

// moeforge's own log-probabilities [S, V] (float64) of the next token after each of `tokens`.
torch::Tensor moeforge_logprobs(LoadedModel& lm, const std::vector<int64_t>& tokens) {
  torch::NoGradGuard ng;
  auto out = lm.model->forward(torch::tensor(tokens, torch::kLong).unsqueeze(0));
  return torch::log_softmax(out.logits.squeeze(0).to(torch::kDouble), -1);
}

// Max |moeforge - llama.cpp| over every position and vocabulary entry.
double max_logprob_diff(const torch::Tensor& ours, const nlohmann::json& theirs) {
  const int64_t S = ours.size(0), V = ours.size(1);
  EXPECT_EQ(int64_t(theirs.size()), S);
  double worst = 0;
  auto a = ours.accessor<double, 2>();
  for (int64_t s = 0; s < S; ++s) {
    EXPECT_EQ(int64_t(theirs[size_t(s)].size()), V);
    for (int64_t v = 0; v < V; ++v) {
      const auto& x = theirs[size_t(s)][size_t(v)];
      const double t = x.is_number() ? x.get<double>() : -INFINITY;  // JSON null: -Infinity (p = 0)
      worst = std::max(worst, std::isfinite(t) ? std::abs(a[s][v] - t) : INFINITY);
    }
  }
  return worst;
}

// A token sequence of the tiny corpus: <s> and two sentences (longer than one RoPE period of the fastest
// pair, so that every position but 0 tests the rotation).
std::vector<int64_t> probe_tokens(const LoadedModel& lm) {
  auto ids = lm.tokenizer->encode("the dog chases the fox. the saw cuts the drill. the bird likes the cat.");
  ids.insert(ids.begin(), lm.tokenizer->bos_id());
  return ids;
}

double gguf_vs_llama(LoadedModel& lm, const MixtralModel& m, const GgufExportOptions& g,
                     const std::string& tag) {
  const std::string dir = fresh_dir(tag);
  write_gguf(dir + "/model.gguf", m, g);
  const auto tokens = probe_tokens(lm);
  auto res = run_llama({{"model", dir + "/model.gguf"}, {"tokens", tokens}}, dir);
  return max_logprob_diff(moeforge_logprobs(lm, tokens), res["logprobs"]);
}

std::vector<std::string> with(std::vector<std::string> extra) {
  return test::interop_overrides(extra);
}

class GgufLlamaCpp : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Layer 0 dense (d_ff 48), layer 1 MoE (experts of width 24, padded to 48); untied output head.
    ckpt_ = new std::string(train_cli("main", with({"model.moe_every=2", "model.tie_embeddings=false"})));
  }
  static void TearDownTestSuite() { delete ckpt_; }
  static std::string* ckpt_;
};
std::string* GgufLlamaCpp::ckpt_ = nullptr;

TEST_F(GgufLlamaCpp, F32LogProbsMatchAtEveryPosition) {
  auto lm = load_model(*ckpt_);
  const double d = gguf_vs_llama(lm, to_mixtral(lm, "gguf"), {}, "f32");
  std::cout << "f32 GGUF, f32 KV cache: max |log p difference| = " << d << "\n";
  // float32 throughout on both sides; the remaining difference is summation order and llama.cpp's float32
  // RoPE angles against moeforge's float64 ones: measured ~1e-6 (docs/interop.md); 2e-5 leaves room for
  // other CPUs' SIMD paths.
  EXPECT_LT(d, 2e-5);
}

TEST_F(GgufLlamaCpp, F16LogProbsMatchLoosely) {
  auto lm = load_model(*ckpt_);
  GgufExportOptions g;
  g.dtype = GgufDType::kF16;
  const double d = gguf_vs_llama(lm, to_mixtral(lm, "gguf"), g, "f16");
  std::cout << "f16 GGUF, f32 KV cache: max |log p difference| = " << d << "\n";
  // f16 weights round each weight by up to 2^-11 relative; through 2 layers that moves log-probabilities
  // by ~1e-3 (docs/interop.md); 1e-2 is still far below what a wrong layout or rotation gives (> 0.1).
  EXPECT_LT(d, 1e-2);
}

// BF16: llama.cpp multiplies bf16 weights by activations it rounds to bf16 (ggml's BF16 products), as
// moeforge does with its weights stored in bf16 (`generate --dtype bf16`, model/inference_precision.h): the
// file is compared with moeforge in float32 and with moeforge on the same bf16 weights.
TEST_F(GgufLlamaCpp, Bf16LogProbsMatchMoeforgeWithBf16Weights) {
  auto lm = load_model(*ckpt_);
  GgufExportOptions g;
  g.dtype = GgufDType::kBF16;
  const std::string dir = fresh_dir("bf16");
  write_gguf(dir + "/model.gguf", to_mixtral(lm, "gguf"), g);
  const auto tokens = probe_tokens(lm);
  auto res = run_llama({{"model", dir + "/model.gguf"}, {"tokens", tokens}}, dir);
  const double vs_f32 = max_logprob_diff(moeforge_logprobs(lm, tokens), res["logprobs"]);
  store_weights_bf16(*lm.model);
  const double vs_bf16 = max_logprob_diff(moeforge_logprobs(lm, tokens), res["logprobs"]);
  std::cout << "bf16 GGUF, f32 KV cache: max |log p difference| = " << vs_bf16
            << " against moeforge with bf16 weights, " << vs_f32 << " against the f32 model\n";
  // Both multiply the same bf16 operands; llama.cpp keeps each product's float32 output, while moeforge's
  // products of more than 16 rows (this prompt's) run in LibTorch's bf16 product, which rounds its output to
  // bf16 (docs/performance.md, "bf16 inference"): measured 0.022 here, against 0.013 for the f32 model.
  // A wrong layout or rotation gives > 0.1 (NegativeControlWithoutQKPermutationDisagrees).
  EXPECT_LT(vs_bf16, 0.05);
  EXPECT_GT(vs_f32, 1e-3);  // the file is really bf16: it does not compute the f32 model's numbers
}

TEST_F(GgufLlamaCpp, NegativeControlWithoutQKPermutationDisagrees) {
  auto lm = load_model(*ckpt_);
  GgufExportOptions g;
  g.skip_qk_permutation = true;
  const double d = gguf_vs_llama(lm, to_mixtral(lm, "gguf"), g, "noperm");
  std::cout << "without the Q/K permutation: max |log p difference| = " << d << "\n";
  EXPECT_GT(d, 1e-2);  // the f32 bound above is 2e-5: the test would fail without the permutation
}

TEST_F(GgufLlamaCpp, GreedyGenerationMatchesMoeforgeGenerate) {
  auto lm = load_model(*ckpt_);
  const std::string dir = fresh_dir("greedy");
  write_gguf(dir + "/model.gguf", to_mixtral(lm, "gguf"));
  const std::string prompt = "the horse follows";
  const int n = 12;
  auto res = run_llama({{"model", dir + "/model.gguf"}, {"prompt", prompt}, {"n_predict", n}}, dir);
  // llama.cpp's SentencePiece tokenizer from the GGUF vocabulary gives moeforge's tokens.
  auto ids = lm.tokenizer->encode(prompt);
  ids.insert(ids.begin(), lm.tokenizer->bos_id());
  EXPECT_EQ(res["prompt_tokens"].get<std::vector<int64_t>>(), ids);
  GenerateOptions g;
  g.temperature = 0;
  g.max_tokens = n;
  g.eos_id = lm.tokenizer->eos_id();
  const auto ours = generate(lm.model, ids, g);
  EXPECT_EQ(res["greedy"].get<std::vector<int64_t>>(), ours);
  // And the CLI says the same text.
  int rc = 0;
  std::string text =
      run_capture(std::string(MOEFORGE_CLI) + " generate --temperature 0 --max-tokens " + std::to_string(n) +
                      " --checkpoint " + quote(*ckpt_) + " --prompt " + quote(prompt),
                  &rc);
  ASSERT_EQ(rc, 0) << text;
  auto squash = [](std::string s) {
    std::string o;
    for (char c : s)
      if (c != ' ' && c != '\n') o += c;
    return o;
  };
  EXPECT_EQ(squash(text), squash(prompt + res["greedy_text"].get<std::string>()));
  std::cout << "greedy: " << text;
}

// loss_free and bip (causal) route by top-K of scores plus a bias / dual: with a zero one they are topk,
// and the export says so and agrees with llama.cpp; a nonzero one is an error naming router and format.
TEST_F(GgufLlamaCpp, ZeroBiasRoutersReduceToTopK) {
  auto base = load_model(*ckpt_);
  for (const std::string router : {"loss_free", "bip"}) {
    LoadedModel lm = base;
    lm.cfg.moe.router = router;
    lm.model = build_model(lm.cfg, lm.tokenizer->vocab_size());
    lm.model->eval();
    auto m = to_mixtral(lm, "gguf");
    ASSERT_FALSE(m.notes.empty());
    EXPECT_NE(m.notes[0].find(router), std::string::npos);
    const double d = gguf_vs_llama(lm, m, {}, "reduce_" + router);
    EXPECT_LT(d, 2e-5) << router;  // the f32 bound of F32LogProbsMatchAtEveryPosition
    // A nonzero bias / dual changes the selection: not expressible.
    for (auto& layer : lm.model->moe_layers())
      for (auto& b : layer->router->named_buffers(false))
        if (b.key() == "bias" || b.key() == "q") b.value().fill_(0.25).index_put_({0}, -0.5);
    try {
      to_mixtral(lm, "gguf");
      ADD_FAILURE() << router << " with a nonzero bias exported";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(router), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("gguf"), std::string::npos) << e.what();
    }
  }
}

TEST_F(GgufLlamaCpp, InexpressibleRoutersAreErrorsNamingRouterAndFormat) {
  auto base = load_model(*ckpt_);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"moe.router=\"expert_choice\"", "expert_choice"},
      {"moe.router=\"hierarchical\"", "hierarchical"},
      {"moe.router=\"moce\"", "moce"},
      {"moe.bip_mode=\"solve\"", "bip_mode"},
      {"moe.score=\"sigmoid\"", "moe.score"},
      {"moe.capacity_factor=1.25", "capacity_factor"},
      {"moe.n_shared_expert=1", "n_shared_expert"},  // with renormalised gates: deepseek does not renormalise
      {"moe.expert_act=\"gelu\"", "expert_act"}};
  for (auto& [set, expect] : cases) {
    std::vector<std::string> o = {set};
    if (expect == "bip_mode") o = {"moe.router=\"bip\"", set};
    if (expect == "hierarchical" || expect == "moce") o.push_back("moe.n_cluster=2");
    LoadedModel lm = base;
    lm.cfg = load_run_config_text(base.cfg.to_toml(), "test", o);
    lm.model = build_model(lm.cfg, lm.tokenizer->vocab_size());
    try {
      to_mixtral(lm, "gguf");
      ADD_FAILURE() << set << " exported";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(expect), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("gguf"), std::string::npos) << e.what();
    }
  }
}

// The gate renormalisation is needed: a topk model with moe.renormalize=false (Switch-style gates p_i) is
// refused by the Mixtral-form formats (hf), written through llama.cpp's deepseek architecture for gguf (and
// agrees), and written anyway as the llama architecture (test switch) llama.cpp computes something else.
TEST(GgufLlamaCppControl, NegativeControlWithoutGateRenormalisationDisagrees) {
  const auto ckpt = train_cli("norenorm", with({"model.moe_every=1", "moe.renormalize=false"}));
  auto lm = load_model(ckpt);
  EXPECT_THROW(to_mixtral(lm, "hf"), ConfigError);
  const auto ds = to_mixtral(lm, "gguf");
  EXPECT_EQ(ds.form, "deepseek");
  const double ok = gguf_vs_llama(lm, ds, {}, "norenorm_deepseek");
  std::cout << "un-renormalised gates as llama.cpp's deepseek architecture: max |log p difference| = " << ok
            << "\n";
  EXPECT_LT(ok, 2e-5);  // the f32 bound of F32LogProbsMatchAtEveryPosition
  MixtralExportOptions o;
  o.allow_unnormalized_gates = true;
  const auto forced = to_mixtral(lm, "gguf", o);
  EXPECT_EQ(forced.form, "mixtral");
  const double d = gguf_vs_llama(lm, forced, {}, "norenorm");
  std::cout << "without the gate renormalisation: max |log p difference| = " << d << "\n";
  EXPECT_GT(d, 1e-2);  // the f32 bound is 2e-5: the comparison catches gates that differ
}

// Shared experts (DeepSeekMoE: ungated, gates not renormalised) through llama.cpp's deepseek architecture:
// 4 layers, 0 and 2 dense, 1 and 3 MoE with one shared expert. Layer 0 is a leading dense block, layer 2 a
// dense layer after an MoE one, written as the shared FFN with zero routed experts (docs/interop.md).
TEST(GgufLlamaCppDeepseek, SharedExpertsAndInnerDenseLayersMatch) {
  const auto ckpt =
      train_cli("deepseek", with({"model.n_layer=4", "model.moe_every=2", "moe.n_shared_expert=1",
                                  "moe.renormalize=false", "model.tie_embeddings=false"}));
  auto lm = load_model(ckpt);
  const auto m = to_mixtral(lm, "gguf");
  ASSERT_EQ(m.form, "deepseek");
  EXPECT_EQ(m.n_dense_lead, 1);
  EXPECT_EQ(m.n_shared, 2);  // d_ff 48 over experts of width 24: two widths, so layer 2 fits
  const double d = gguf_vs_llama(lm, m, {}, "deepseek");
  std::cout << "deepseek architecture (shared experts, dense layers), f32: max |log p difference| = " << d
            << "\n";
  EXPECT_LT(d, 2e-5);  // the f32 bound of F32LogProbsMatchAtEveryPosition
  // Left out, the shared experts change every output: the comparison sees it.
  auto broken = m;
  for (auto& L : broken.layers)
    if (L.sh_down.defined()) L.sh_down = torch::zeros_like(L.sh_down);
  const double control = gguf_vs_llama(lm, broken, {}, "deepseek_noshared");
  std::cout << "shared experts zeroed (negative control): max |log p difference| = " << control << "\n";
  EXPECT_GT(control, 1e-2);
}

// Top-1 (Switch): moeforge's gate is the chosen probability p; the deepseek architecture keeps p.
TEST(GgufLlamaCppDeepseek, SwitchTopOneMatches) {
  const auto ckpt = train_cli("switch", with({"model.moe_every=1", "moe.n_expert_used=1"}));
  auto lm = load_model(ckpt);
  EXPECT_THROW(to_mixtral(lm, "hf"), ConfigError);
  const auto m = to_mixtral(lm, "gguf");
  ASSERT_EQ(m.form, "deepseek");
  EXPECT_EQ(m.n_dense_lead, 0);
  const double d = gguf_vs_llama(lm, m, {}, "switch");
  std::cout << "top-1 as the deepseek architecture, f32: max |log p difference| = " << d << "\n";
  EXPECT_LT(d, 2e-5);  // the f32 bound of F32LogProbsMatchAtEveryPosition
}

// q8_0: llama.cpp runs the quantised weights (and quantises activations to 8 bits for its q8_0 products),
// so it is compared with moeforge running the same quantised weights: every matrix that the writer stores
// as q8_0 replaced by dequantize(quantize(w)), those kept f16 rounded to f16.
TEST_F(GgufLlamaCpp, Q8_0LogProbsMatchMoeforgeOnTheQuantisedWeights) {
  auto lm = load_model(*ckpt_);
  const auto m = to_mixtral(lm, "gguf");
  GgufExportOptions g;
  g.dtype = GgufDType::kQ8_0;
  std::vector<std::string> notes;
  g.notes = &notes;
  const std::string dir = fresh_dir("q8_0");
  write_gguf(dir + "/model.gguf", m, g);
  EXPECT_FALSE(notes.empty());  // the down projections (rows of 48) stay f16, and export says so
  const auto tokens = probe_tokens(lm);
  auto res = run_llama({{"model", dir + "/model.gguf"}, {"tokens", tokens}}, dir);
  const double vs_f32 = max_logprob_diff(moeforge_logprobs(lm, tokens), res["logprobs"]);
  LoadedModel q = load_model(*ckpt_);
  {
    torch::NoGradGuard ng;
    for (auto& p : q.model->named_parameters()) {
      auto& w = p.value();
      // Norms and the router stay float32 in the file.
      if (w.dim() < 2 || p.key().find("router") != std::string::npos) continue;
      // The file's rows are the last dimension (experts zero-padded to the dense width 48 first, which
      // changes no block of a row of C = 32 and makes the down projections f16).
      const bool padded_rows = p.key().find("w_down") != std::string::npos;
      if (!padded_rows && w.size(-1) % 32 == 0)
        w.copy_(dequantize_q8_0(quantize_q8_0(w), w.sizes().vec()));
      else
        w.copy_(w.to(torch::kHalf).to(torch::kFloat));
    }
  }
  const double vs_quantised = max_logprob_diff(moeforge_logprobs(q, tokens), res["logprobs"]);
  std::cout << "q8_0 GGUF, f32 KV cache: max |log p difference| = " << vs_quantised
            << " against moeforge on the quantised weights, " << vs_f32 << " against the f32 model ("
            << notes.size() << " tensors kept f16)\n";
  // What remains is llama.cpp's 8-bit quantisation of the activations in its q8_0 products (each block of
  // 32 inputs rounded to max|x| / 127 steps): measured in docs/interop.md; a wrong block layout, scale or
  // rotation gives O(1).
  EXPECT_LT(vs_quantised, 0.15);
  EXPECT_GT(vs_f32, 1e-3);  // the file is really quantised: it does not compute the f32 model's numbers
}

TEST(GgufExport, Q8_0BlocksRoundTripWithinHalfAStep) {
  torch::manual_seed(3);
  auto x = torch::randn({5, 64}) * torch::linspace(0.01, 3, 64);
  x.index_put_({2}, 0.0f);  // an all-zero block has d = 0
  const auto blocks = quantize_q8_0(x);
  EXPECT_EQ(blocks.size(), size_t(5 * 2 * 34));  // 2 blocks of 34 bytes per row
  const auto y = dequantize_q8_0(blocks, {5, 64});
  const auto amax = x.view({10, 32}).abs().amax(1, true);
  // Each weight is within half a quantisation step d = max|block| / 127, plus the f16 rounding of d
  // (2^-11 relative) times |q| <= 127.
  const auto bound = amax / 127 * (0.5 + 127 * std::ldexp(1.0, -11)) + 1e-12;
  EXPECT_TRUE(((y - x).view({10, 32}).abs() <= bound).all().item<bool>());
  EXPECT_TRUE(y[2].eq(0).all().item<bool>());
  EXPECT_THROW(quantize_q8_0(torch::zeros({3, 20})), std::invalid_argument);
}

TEST(GgufExport, QKPermutationIsAdjacentPairsPerHead) {
  auto w = torch::arange(2 * 8, torch::kFloat).view({2 * 8, 1});  // 2 heads of D = 8, row i holds i
  auto p = rope_half_to_adjacent_rows(w, 2).view(-1);
  const std::vector<float> want = {0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15};
  EXPECT_EQ(std::vector<float>(p.data_ptr<float>(), p.data_ptr<float>() + 16), want);
}

TEST(GgufExport, CliRejectsUnknownFormatAndDtype) {
  int rc = 0;
  auto out = run_capture(
      std::string(MOEFORGE_CLI) + " export --checkpoint /nonexistent --format onnx --out x 2>&1", &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("onnx"), std::string::npos) << out;
  out = run_capture(
      std::string(MOEFORGE_CLI) + " export --checkpoint /nonexistent --format gguf --dtype q4 --out x 2>&1",
      &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("q4"), std::string::npos) << out;
}

}  // namespace

namespace {

// llama.cpp aborts on characters without a piece when there are no byte pieces (docs/interop.md): a
// tokenizer trained without data.byte_fallback is refused, naming the key, and the CLI exits non-zero.
TEST(GgufExport, TokenizerWithoutBytePiecesIsRefusedNamingTheKey) {
  const auto ckpt = train_cli("nobytes", with({"data.byte_fallback=false", "data.vocab_size=128"}));
  auto lm = load_model(ckpt);
  try {
    gguf_bytes(to_mixtral(lm, "gguf"));
    ADD_FAILURE() << "exported without byte pieces";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("data.byte_fallback"), std::string::npos) << e.what();
  }
  int rc = 0;
  const auto out =
      run_capture(std::string(MOEFORGE_CLI) + " export --checkpoint " + quote(ckpt) +
                      " --format gguf --out " + quote(fresh_dir("nobytes_out") + "/m.gguf") + " 2>&1",
                  &rc);
  EXPECT_NE(rc, 0);
  EXPECT_NE(out.find("data.byte_fallback"), std::string::npos) << out;
}

}  // namespace
