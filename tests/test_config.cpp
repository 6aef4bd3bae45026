// Bad configuration values are rejected with a message naming the field.
#include "moeforge/config/binder.h"
#include "moeforge/config/moe_config.h"
#include "moeforge/layer/moe_layer.h"
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
  // The layer refuses a bad config at construction.
  MoEConfig bad;
  bad.n_expert_used = 12;
  expect_config_error([&] { MoELayer layer(bad, 8); }, "moe.n_expert_used");
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

// A router's own option without a MoEConfig field (docs/routing.md, "Adding a router"): bound by its row
// into router_options, read from files and --set, written back by to_toml.
TEST(Config, RouterOptionsBindThroughTheBinder) {
  MoEConfig c;
  ConfigBinder b;
  bind_router_option(b, &c, "my_router_alpha", 0.25);
  EXPECT_DOUBLE_EQ(c.router_option("my_router_alpha"), 0.25);
  b.apply_override("moe.my_router_alpha=0.5");
  EXPECT_DOUBLE_EQ(c.router_option("my_router_alpha"), 0.5);
  EXPECT_NE(b.to_toml().find("my_router_alpha = 0.5"), std::string::npos) << b.to_toml();
  MoEConfig again = c;  // a copy keeps the value; binding it again does not reset it
  ConfigBinder b2;
  bind_router_option(b2, &again, "my_router_alpha", 0.25);
  EXPECT_DOUBLE_EQ(again.router_option("my_router_alpha"), 0.5);
  test::expect_config_error([&] { c.router_option("unbound_key"); }, "moe.unbound_key");
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
