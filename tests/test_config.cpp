// Bad configuration values are rejected with a message naming the field.
#include "moeforge/config/binder.h"
#include "moeforge/config/run_config.h"
#include "moeforge/layer/moe_layer.h"
#include "moeforge/routing/moe_config.h"
#include "moeforge/util/error.h"
#include "test_util.h"

namespace moeforge {
namespace {

using ::moeforge::test::expect_config_error;

TEST(Config, DefaultsAreValid) {
  EXPECT_NO_THROW(MoEConfig{}.validate());
}

TEST(Config, BadValuesNameTheirField) {
  auto with = [](auto change) {
    MoEConfig c;
    change(c);
    return [c] { c.validate(); };
  };
  expect_config_error(with([](MoEConfig& c) { c.n_expert_used = 9; }), "moe.n_expert_used");  // K > E
  expect_config_error(with([](MoEConfig& c) { c.n_expert_used = 0; }), "moe.n_expert_used");
  expect_config_error(with([](MoEConfig& c) { c.n_expert = 0; }), "moe.n_expert");
  expect_config_error(with([](MoEConfig& c) { c.capacity_factor = -0.5; }), "moe.capacity_factor");
  expect_config_error(with([](MoEConfig& c) { c.router = "nope"; }), "moe.router");
  expect_config_error(with([](MoEConfig& c) { c.d_expert = 10, c.expert_split = 3; }), "moe.expert_split");
  expect_config_error(with([](MoEConfig& c) { c.balance_coef = -1; }), "moe.balance_coef");
  expect_config_error(with([](MoEConfig& c) { c.z_loss_coef = std::nan(""); }), "moe.z_loss_coef");
  expect_config_error(with([](MoEConfig& c) { c.n_expert_used = 1, c.gshard_random_second = true; }),
                      "moe.gshard_random_second");
  // A whole run's config names the field too (the layer and the routers take a validated config:
  // docs/architecture.md, "Config sections").
  RunConfig bad;
  bad.moe.n_expert_used = 12;
  expect_config_error([&] { bad.validate(); }, "moe.n_expert_used");
}

TEST(Config, TomlFileAndOverrides) {
  MoEConfig c;
  ConfigBinder b;
  bind_moe_config(b, &c);
  b.apply_text("[moe]\nn_expert = 16\nscore = \"sigmoid\"\ncapacity_factor = 1.25\n", "test.toml");
  EXPECT_EQ(c.n_expert, 16);
  EXPECT_EQ(c.score, ScoreFunc::kSigmoid);
  EXPECT_DOUBLE_EQ(c.capacity_factor, 1.25);
  b.apply_override("moe.n_expert_used=4");
  b.apply_override("moe.overflow=batch_prioritized");  // bare word read as a string
  EXPECT_EQ(c.n_expert_used, 4);
  EXPECT_EQ(c.overflow, OverflowOrder::kBatchPrioritized);

  expect_config_error([&] { b.apply_text("[moe]\nn_experts = 4\n", "t.toml"); }, "moe.n_experts");  // unknown
  expect_config_error([&] { b.apply_text("[moe]\nn_expert = \"four\"\n", "t.toml"); }, "moe.n_expert");
  expect_config_error([&] { b.apply_text("[moe]\nscore = \"tanh\"\n", "t.toml"); }, "moe.score");
  expect_config_error([&] { b.apply_override("moe.noisy=maybe"); }, "moe.noisy");
  expect_config_error([&] { b.apply_override("moe.bogus=1"); }, "moe.bogus");
  // The position of a bad value is in the message.
  try {
    b.apply_text("[moe]\n\nn_expert = 2.5\n", "where.toml");
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("where.toml:3"), std::string::npos) << e.what();
  }
}

// A router's own options (docs/routing.md, "Adding a router"): its options struct, bound by its registry
// row under "moe.<key>" for every config, read from files and --set, written back by to_toml, and checked
// by its row only when it is the router picked.
TEST(Config, RouterOptionsBindThroughTheirRegistryRow) {
  MoEConfig c;
  ConfigBinder b;
  bind_moe_config(b, &c);
  b.apply_override("moe.ec_capacity_factor=3.5");
  EXPECT_DOUBLE_EQ(c.expert_choice.capacity_factor, 3.5);
  EXPECT_NE(b.to_toml().find("ec_capacity_factor = 3.5"), std::string::npos) << b.to_toml();
  b.apply_override("moe.bias_update_rate=-1");  // loss_free's key while topk is picked: not checked
  EXPECT_DOUBLE_EQ(c.loss_free.bias_update_rate, -1);
  EXPECT_NO_THROW(c.validate());
  c.router = "loss_free";
  test::expect_config_error([&] { c.validate(); }, "moe.bias_update_rate");
  MoEConfig again = c;  // a copy keeps the values
  EXPECT_DOUBLE_EQ(again.expert_choice.capacity_factor, 3.5);
}

// Every float key refuses inf and nan (train.adam_eps = inf trained to exit 0), an integer TOML cannot hold
// is "out of range", not "a string", and an unknown or bad value is echoed cut (docs/reliability.md).
TEST(Config, NonFiniteFloatsAndOutOfRangeIntegersAreNamed) {
  for (const char* set :
       {"train.lr=inf", "train.adam_eps=inf", "train.weight_decay=nan", "moe.balance_coef=-inf"}) {
    RunConfig c;
    ConfigBinder b;
    bind_run_config(b, &c);
    const std::string s = set;
    try {
      b.apply_override(s);
      ADD_FAILURE() << s << ": accepted";
    } catch (const ConfigError& e) {
      EXPECT_EQ(e.field(), s.substr(0, s.find('=')));
      EXPECT_NE(std::string(e.what()).find("finite"), std::string::npos) << e.what();
    }
  }
  RunConfig c;
  ConfigBinder b;
  bind_run_config(b, &c);
  try {
    b.apply_override("train.steps=9223372036854775808");
    ADD_FAILURE() << "accepted";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.field(), "train.steps");
    EXPECT_NE(std::string(e.what()).find("out of range"), std::string::npos) << e.what();
  }
  try {
    b.apply_override("moe.score=" + std::string(100000, 'z'));
    ADD_FAILURE() << "accepted";
  } catch (const ConfigError& e) {
    EXPECT_LT(std::string(e.what()).size(), 600u) << "the value was echoed whole";
  }
}

// Fuzz finding (docs/reliability.md): an integer with no exact double for a float key threw
// std::bad_optional_access out of the binder.
TEST(Config, HugeIntegerForAFloatKeyIsANumber) {
  MoEConfig c;
  ConfigBinder b;
  bind_moe_config(b, &c);
  b.apply_text("[moe]\ncapacity_factor = 9999900000000001\n", "test.toml");
  EXPECT_EQ(c.capacity_factor, 9999900000000001.0);
  b.apply_override("moe.capacity_factor=9223372036854775807");
  EXPECT_EQ(c.capacity_factor, 9223372036854775807.0);
}

}  // namespace
}  // namespace moeforge
