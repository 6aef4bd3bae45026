// The whole transformer against a PyTorch reference of the same architecture (scripts/golden/transformer.py),
// and generation with the KV cache against full recomputation.
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/generate.h"
#include "moeforge/model/transformer.h"
#include "test_util.h"

namespace moeforge {
namespace {

int64_t meta(const SafeTensors& g, const char* k) {
  return std::stoll(g.metadata.at(k));
}

TEST(Model, ForwardBackwardMatchPyTorch) {
  const auto g = test::load_golden("transformer");
  ModelConfig m;
  m.vocab_size = meta(g, "V");
  m.d_model = meta(g, "C");
  m.n_head = meta(g, "H");
  m.n_layer = meta(g, "L");
  m.d_ff = meta(g, "d_ff");
  m.moe_every = meta(g, "moe_every");
  m.max_seq_len = meta(g, "S");
  MoEConfig moe;
  moe.n_expert = meta(g, "E");
  moe.n_expert_used = meta(g, "K");
  moe.d_expert = meta(g, "d_expert");
  moe.balance_coef = std::stod(g.metadata.at("balance_coef"));
  moe.z_loss_coef = std::stod(g.metadata.at("z_loss_coef"));
  TransformerLM model(m, moe);
  model->to(torch::kDouble);
  NamedTensors state;
  for (auto& [name, t] : g.tensors)
    if (name.rfind("param.", 0) == 0) state.push_back({name.substr(6), t});
  load_module_state(*model, state, "golden transformer");

  const int64_t B = meta(g, "B"), S = meta(g, "S");
  auto tokens = g.at("tokens");
  auto out = model->forward(tokens.narrow(1, 0, S));
  // float64 on both sides through ~3 layers of the same operations: differences of a few ulps, amplified by
  // softmaxes; 1e-10 absolute is far above that and far below any real discrepancy.
  EXPECT_TENSOR_NEAR(out.logits, g.at("logits"), 1e-10, 1e-9);
  auto ce = torch::nn::functional::cross_entropy(out.logits.reshape({B * S, -1}),
                                                 tokens.narrow(1, 1, S).reshape(-1));
  EXPECT_TENSOR_NEAR(ce, g.at("ce"), 1e-10, 1e-9);
  EXPECT_TENSOR_NEAR(out.aux_loss, g.at("aux_loss"), 1e-10, 1e-9);
  (ce + out.aux_loss).backward();
  for (auto& p : model->named_parameters()) {
    SCOPED_TRACE(p.key());
    EXPECT_TENSOR_NEAR(p.value().grad(), g.at("grad." + p.key()), 1e-10, 1e-8);
  }
}

ModelConfig tiny() {
  ModelConfig m;
  m.vocab_size = 23;
  m.d_model = 16;
  m.n_head = 2;
  m.n_layer = 2;
  m.d_ff = 20;
  m.moe_every = 1;
  m.max_seq_len = 24;
  return m;
}

TEST(Model, KVCacheMatchesFullRecomputation) {
  torch::manual_seed(2);
  MoEConfig moe;
  moe.n_expert = 4;
  moe.d_expert = 8;
  TransformerLM model(tiny(), moe);
  model->eval();
  torch::NoGradGuard ng;
  auto tokens = torch::randint(0, 23, {1, 10}, torch::kLong);
  auto full = model->forward(tokens).logits;  // [1, 10, V]
  KVCache cache;
  auto first = model->forward(tokens.narrow(1, 0, 6), {}, &cache).logits;
  std::vector<torch::Tensor> steps = {first};
  for (int64_t i = 6; i < 10; ++i) steps.push_back(model->forward(tokens.narrow(1, i, 1), {}, &cache).logits);
  // Same float32 arithmetic in a different grouping (cached keys): 1e-5 covers the reassociation.
  EXPECT_TENSOR_NEAR(torch::cat(steps, 1), full, 1e-5, 1e-4);
}

// The cache is written in place: a step within the buffer's capacity copies only its own position (the
// buffer stays where it was), a full buffer doubles, and the filled part always equals the concatenation of
// every step's keys and values.
TEST(Model, KVSlotAppendsInPlaceAndDoubles) {
  torch::manual_seed(4);
  KVSlot slot;
  std::vector<torch::Tensor> ks, vs;
  const void* buffer = nullptr;
  int64_t moves = 0;
  for (int64_t step = 0; step < 80; ++step) {
    const int64_t S = step == 0 ? 5 : 1;  // a prompt, then one position a step
    auto k = torch::randn({2, 3, S, 4}), v = torch::randn({2, 3, S, 4});
    ks.push_back(k);
    vs.push_back(v);
    auto [k_all, v_all] = slot.append(k, v);
    if (slot.k.data_ptr() != buffer) {
      ++moves;
      buffer = slot.k.data_ptr();
    }
    ASSERT_EQ(slot.length, k_all.size(2));
    ASSERT_TRUE(torch::equal(k_all, torch::cat(ks, 2))) << "step " << step;
    ASSERT_TRUE(torch::equal(v_all, torch::cat(vs, 2))) << "step " << step;
  }
  EXPECT_EQ(slot.length, 84);
  EXPECT_EQ(slot.k.size(2), 128);  // 64, then doubled once
  EXPECT_EQ(moves, 2);             // allocated once, grown once: 78 of the 80 steps wrote in place
}

TEST(Model, GenerationIsDeterministicWithASeed) {
  torch::manual_seed(3);
  MoEConfig moe;
  moe.n_expert = 4;
  moe.d_expert = 8;
  TransformerLM model(tiny(), moe);
  GenerateOptions opt;
  opt.max_tokens = 12;
  opt.temperature = 1.0;
  opt.seed = 42;
  auto a = generate(model, {1, 2, 3}, opt);
  auto b = generate(model, {1, 2, 3}, opt);
  EXPECT_EQ(a, b);
  EXPECT_EQ(a.size(), 12u);
  opt.seed = 43;
  auto c = generate(model, {1, 2, 3}, opt);
  EXPECT_NE(a, c);  // 12 draws over 23 tokens at temperature 1: equal sequences are vanishingly unlikely
  // Bounded by the context: the last of at most 22 new tokens is sampled from a full 24-token context,
  // and the caller learns that the context, not max_tokens, ended it.
  opt.max_tokens = 100;
  GenerateStop why = GenerateStop::kMaxTokens;
  EXPECT_EQ(generate(model, {1, 2, 3}, opt, &why).size(), 22u);
  EXPECT_EQ(why, GenerateStop::kContext);
  opt.max_tokens = 5;
  generate(model, {1, 2, 3}, opt, &why);
  EXPECT_EQ(why, GenerateStop::kMaxTokens);
}

// Sampling parameters out of range are errors naming the parameter (NaN included), and so is a prompt
// that leaves no room in the context; no LibTorch assertion reaches the user (docs/reliability.md).
TEST(Model, GenerationRefusesBadParametersAndPrompts) {
  MoEConfig moe;
  moe.n_expert = 4;
  moe.d_expert = 8;
  TransformerLM model(tiny(), moe);
  auto refused = [&](GenerateOptions opt, const std::vector<int64_t>& prompt, const std::string& names) {
    try {
      generate(model, prompt, opt);
      ADD_FAILURE() << names << ": generated";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(names), std::string::npos) << e.what();
    }
  };
  GenerateOptions ok;
  refused(
      [&] {
        auto o = ok;
        o.temperature = std::nan("");
        return o;
      }(),
      {1}, "temperature");
  refused(
      [&] {
        auto o = ok;
        o.temperature = -0.5;
        return o;
      }(),
      {1}, "temperature");
  refused(
      [&] {
        auto o = ok;
        o.top_p = 0;
        return o;
      }(),
      {1}, "top_p");
  refused(
      [&] {
        auto o = ok;
        o.top_p = std::nan("");
        return o;
      }(),
      {1}, "top_p");
  refused(
      [&] {
        auto o = ok;
        o.max_tokens = 0;
        return o;
      }(),
      {1}, "max_tokens");
  refused(ok, std::vector<int64_t>(24, 1), "context is 24");
  refused(ok, {}, "at least one token");
}

TEST(Model, CountsActiveParameters) {
  MoEConfig moe;
  moe.n_expert = 4;
  moe.n_expert_used = 1;
  moe.d_expert = 8;
  TransformerLM model(tiny(), moe);
  auto c = count_model(*model);
  const int64_t experts_per_layer = 4 * 3 * 8 * 16;  // E * 3 matrices * F * C
  EXPECT_EQ(c.total_params - c.active_params,
            2 * experts_per_layer * 3 / 4);  // 3 of 4 experts idle, 2 layers
}

}  // namespace
}  // namespace moeforge
