// Ten training steps against a PyTorch reference (scripts/golden/train_steps.py), as llm.c's test_gpt2
// checks a few steps of training: the loss of every step, the final parameters and, for loss-free
// balancing, the final router bias, for a top-2 router with balance + z-loss and for a stateful router.
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/transformer.h"
#include "moeforge/train/optim.h"
#include "test_util.h"

namespace moeforge {
namespace {

int64_t meta(const SafeTensors& g, const char* k) {
  return std::stoll(g.metadata.at(k));
}
double meta_d(const SafeTensors& g, const char* k) {
  return std::stod(g.metadata.at(k));
}

void check_training(const std::string& router) {
  const auto g = test::load_golden("train_steps_" + router);
  ModelConfig m;
  m.vocab_size = meta(g, "V");
  m.d_model = meta(g, "C");
  m.n_head = meta(g, "H");
  m.n_layer = meta(g, "L");
  m.moe_every = 1;
  m.max_seq_len = meta(g, "S");
  m.norm_eps = meta_d(g, "norm_eps");
  m.rope_theta = meta_d(g, "rope_theta");
  MoEConfig moe;
  moe.router = router;
  moe.n_expert = meta(g, "E");
  moe.n_expert_used = meta(g, "K");
  moe.d_expert = meta(g, "d_expert");
  moe.balance_coef = meta_d(g, "balance_coef");
  moe.z_loss_coef = meta_d(g, "z_loss_coef");
  moe.loss_free.bias_update_rate = meta_d(g, "bias_update_rate");
  TrainConfig tc;
  tc.steps = meta(g, "steps");
  tc.lr = meta_d(g, "lr");
  tc.warmup = meta(g, "warmup");
  tc.min_lr_ratio = meta_d(g, "min_lr_ratio");
  tc.weight_decay = meta_d(g, "weight_decay");
  tc.beta1 = meta_d(g, "beta1");
  tc.beta2 = meta_d(g, "beta2");
  tc.adam_eps = meta_d(g, "adam_eps");
  tc.grad_clip = meta_d(g, "grad_clip");

  TransformerLM model(m, moe);
  model->to(torch::kDouble);
  NamedTensors state;
  for (auto& [name, t] : g.tensors)
    if (name.rfind("init.", 0) == 0) state.push_back({name.substr(5), t});
  for (auto& b : model->named_buffers())  // router state starts at its initial value (bias 0, mask 1)
    state.push_back({b.key(), b.value().clone()});
  load_module_state(*model, state, "golden train_steps_" + router);
  model->train();
  std::vector<std::pair<std::string, torch::Tensor>> named;
  std::vector<torch::Tensor> params;
  for (auto& p : model->named_parameters()) {
    named.push_back({p.key(), p.value()});
    params.push_back(p.value());
  }
  AdamW optim(named, tc);

  const int64_t B = meta(g, "B"), S = meta(g, "S");
  const auto batches = g.at("batches");     // [steps, B, S+1]
  const auto expect_loss = g.at("losses");  // [steps]
  for (int64_t step = 0; step < tc.steps; ++step) {
    auto tokens = batches[step];
    auto out = model->forward(tokens.narrow(1, 0, S));
    auto ce = torch::nn::functional::cross_entropy(out.logits.reshape({B * S, -1}),
                                                   tokens.narrow(1, 1, S).reshape(-1));
    (ce + out.aux_loss).backward();
    // float64 on both sides with the same operations; ten steps of AdamW amplify ulp differences a little
    // (Adam divides by sqrt(v)), still orders of magnitude below 1e-8.
    EXPECT_NEAR(ce.item<double>(), expect_loss[step].item<double>(), 1e-8) << router << " step " << step + 1;
    clip_grad_norm(params, tc.grad_clip);
    optim.step(learning_rate(tc, step));
    model->after_step();
    optim.zero_grad();
  }
  for (auto& p : model->named_parameters()) {
    SCOPED_TRACE(router + " " + p.key());
    EXPECT_TENSOR_NEAR(p.value(), g.at("final." + p.key()), 1e-8, 1e-7);
  }
  for (auto& b : model->named_buffers()) {
    if (b.key().size() < 5 || b.key().substr(b.key().size() - 5) != ".bias") continue;
    SCOPED_TRACE(router + " " + b.key());
    EXPECT_TENSOR_NEAR(b.value().to(torch::kDouble), g.at("final." + b.key()), 1e-12, 0);
  }
}

TEST(GoldenTraining, TenStepsOfTopTwoMatchPyTorch) {
  check_training("topk");
}

TEST(GoldenTraining, TenStepsOfLossFreeMatchPyTorch) {
  check_training("loss_free");
}

}  // namespace
}  // namespace moeforge
