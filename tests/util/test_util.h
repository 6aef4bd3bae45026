// Shared helpers for moeforge's tests: tensor comparison that prints the largest difference and the first
// mismatches (llm.c's check_tensor), golden-file loading, finite differences.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "moeforge/io/safetensors.h"
#include "moeforge/routing/moce.h"
#include "moeforge/routing/router.h"
#include "moeforge/util/error.h"

namespace moeforge::test {

// |a - b| <= atol + rtol * |b| elementwise; on failure reports max abs diff and the first 5 mismatches.
::testing::AssertionResult tensors_close(const torch::Tensor& actual, const torch::Tensor& expected,
                                         double atol, double rtol);

#define EXPECT_TENSOR_NEAR(actual, expected, atol, rtol)                             \
  EXPECT_TRUE(::moeforge::test::tensors_close((actual), (expected), (atol), (rtol))) \
      << #actual " vs " #expected

// Expects `fn` to throw ConfigError for `field` with a message that names it.
template <class Fn>
void expect_config_error(Fn fn, const std::string& field) {
  try {
    fn();
    ADD_FAILURE() << "no error for " << field;
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), field) << e.what();
    EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
  }
}

// Golden files written by scripts/golden at build time.
SafeTensors load_golden(const std::string& name);

// Central finite-difference gradient of scalar f() with respect to every element of `param` (double).
torch::Tensor numeric_grad(const std::function<torch::Tensor()>& f, torch::Tensor param, double eps = 1e-6);

// A folder `name` under the test temporary folder, filled by `write` once per machine: written into a folder
// of this process's own and renamed into place, so that test processes running in parallel (ctest -j)
// never read a half-written or removed folder. `write` must be a pure function of nothing: change `name`
// when what it writes changes.
std::string shared_test_dir(const std::string& name,
                            const std::function<void(const std::filesystem::path&)>& write);

// A small generated text corpus in a temporary folder (two domains, "animals" and "tools", of templated
// sentences; learnable by a tiny model in a few dozen steps), for data.corpus = "text:<path>".
std::string tiny_text_corpus();

// --set overrides for a tiny model trained on tiny_text_corpus(); `name` keeps each test's tokenizer cache
// apart. Extra overrides are appended (later ones win).
std::vector<std::string> tiny_run_overrides(const std::string& name,
                                            const std::vector<std::string>& extra = {});

// The feedback of one training step that routed exactly `plan` (no health, no token loss): what a router's
// after_step sees from a layer that ran one micro-batch.
inline RouteFeedback feedback_of(const RoutingPlan& plan) {
  RouteFeedback fb;
  fb.add_plan(plan);
  return fb;
}

// MoCE's routing state as tests read and set it (routing/moce.h; docs/routing.md, "Router state"): every
// token's cluster (the plan's carry), each sequence's cluster (its last position's: the second of the
// plan's sequence rows), and a context state that hands a router given sequence clusters.
inline torch::Tensor moce_token_clusters(const RoutingPlan& plan) {
  const auto* carry = dynamic_cast<const MoceCarry*>(plan.carry.get());
  return carry ? carry->token_cluster : torch::Tensor();
}
inline torch::Tensor moce_seq_clusters(const RoutingPlan& plan) {
  return plan.sequence_rows.size() > 1 ? plan.sequence_rows[1] : torch::Tensor();
}
inline RouterStatePtr moce_given_seq_clusters(const torch::Tensor& ids) {
  auto s = std::make_shared<MoceCache>();
  s->seq_cluster = ids;
  return s;
}

}  // namespace moeforge::test
