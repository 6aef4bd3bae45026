// The profiling scopes that `moeforge bench --train --profile` sums a training step by
// (docs/performance.md, "Where a training step goes"): every category is opened in a training forward,
// the scopes do not nest, and the backward nodes of the step fall inside the scopes' sequence ranges.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "moeforge/model/transformer.h"
#include "moeforge/train/trainer.h"

namespace moeforge {
namespace {

struct Seen {
  std::vector<std::string> names;  // scope names, in the order they opened
  int depth = 0, max_depth = 0;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // per scope: [first, past-last) sequence number
  std::vector<int64_t> node_seqs;                     // backward nodes
};
Seen* g_seen = nullptr;

struct Start : at::ObserverContext {
  uint64_t seq0 = 0;
};

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  if (g_seen == nullptr) return nullptr;
  if (fn.scope() == at::RecordScope::BACKWARD_FUNCTION) return nullptr;
  const std::string name = fn.name();
  if (name.rfind("moeforge::", 0) != 0) return nullptr;
  g_seen->names.push_back(name.substr(10));
  g_seen->max_depth = std::max(g_seen->max_depth, ++g_seen->depth);
  auto s = std::make_unique<Start>();
  s->seq0 = at::sequence_number::peek();
  return s;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext* ctx) {
  if (g_seen == nullptr) return;
  if (fn.scope() == at::RecordScope::BACKWARD_FUNCTION) {
    g_seen->node_seqs.push_back(fn.seqNr());
    return;
  }
  if (ctx == nullptr) return;
  --g_seen->depth;
  g_seen->ranges.push_back({static_cast<Start*>(ctx)->seq0, at::sequence_number::peek()});
}

TEST(ProfileScopes, TrainingStepOpensEveryCategoryWithoutNesting) {
  torch::manual_seed(3);
  ModelConfig m;
  m.vocab_size = 23;
  m.d_model = 16;
  m.n_head = 2;
  m.n_layer = 2;
  m.d_ff = 20;
  m.moe_every = 2;  // layer 1 dense, layer 2 MoE
  m.max_seq_len = 24;
  MoEConfig moe;
  moe.n_expert = 4;
  moe.d_expert = 8;
  TransformerLM model(m, moe);
  model->train();
  Batcher::Batch batch;
  batch.tokens = torch::randint(0, 23, {2, 9}, torch::kLong);
  batch.domain = torch::zeros({2}, torch::kLong);

  Seen seen;
  auto handle = at::addThreadLocalCallback(
      at::RecordFunctionCallback(on_start, on_end)
          .scopes({at::RecordScope::USER_SCOPE, at::RecordScope::BACKWARD_FUNCTION}));
  g_seen = &seen;
  auto fwd = training_forward(model, batch);
  (fwd.loss() + fwd.out.aux_loss).backward();
  g_seen = nullptr;
  at::removeCallback(handle);

  std::map<std::string, int> count;
  for (const auto& n : seen.names) ++count[n];
  const std::map<std::string, int> want = {{"embedding", 1},         {"norm", 5},         {"attention", 2},
                                           {"dense_ffn", 1},         {"routing", 1},      {"experts", 1},
                                           {"output_projection", 1}, {"cross_entropy", 1}};
  EXPECT_EQ(count, want);
  EXPECT_EQ(seen.max_depth, 1) << "scopes nest: a step's time would be counted twice";
  // Most backward nodes belong to a scope (the rest: residual adds, aux loss, gradient accumulation).
  size_t inside = 0;
  for (int64_t s : seen.node_seqs)
    for (const auto& [b, e] : seen.ranges)
      if (s >= 0 && uint64_t(s) >= b && uint64_t(s) < e) {
        ++inside;
        break;
      }
  ASSERT_FALSE(seen.node_seqs.empty());
  EXPECT_GT(inside, seen.node_seqs.size() / 2) << inside << " of " << seen.node_seqs.size();
}

}  // namespace
}  // namespace moeforge
