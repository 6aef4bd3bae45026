// Hugging Face export and import (docs/interop.md): an independent float64 PyTorch forward written from
// transformers' Mixtral / Llama modelling code (scripts/interop/hf_mixtral_forward.py) computes moeforge's
// logits from the exported folder; export -> import -> export gives the same tensor bytes; bf16 is
// converted; bad folders are errors naming the file and tensor.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "interop_util.h"
#include "moeforge/interop/export.h"
#include "moeforge/interop/hf.h"
#include "moeforge/io/safetensors.h"
#include "moeforge/model/load.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/error.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace moeforge;
using test::fresh_dir;
using test::quote;
using test::run_capture;

namespace {

std::vector<int64_t> probe_tokens(const LoadedModel& lm) {
  auto ids = lm.tokenizer->encode("the dog chases the fox. the saw cuts the drill. the bird likes the cat.");
  ids.insert(ids.begin(), lm.tokenizer->bos_id());
  return ids;
}

torch::Tensor moeforge_logits(LoadedModel& lm, const std::vector<int64_t>& tokens) {
  torch::NoGradGuard ng;
  return lm.model->forward(torch::tensor(tokens, torch::kLong).unsqueeze(0))
      .logits.squeeze(0)
      .to(torch::kDouble);
}

// The Python reader's logits [S, V] of `tokens` for the folder `dir`.
torch::Tensor python_logits(const std::string& dir, const std::vector<int64_t>& tokens) {
  const std::string tok = dir + "/../tokens.json", out = dir + "/../logits.json";
  std::ofstream(tok) << json(tokens).dump();
  int rc = 0;
  const std::string log = run_capture(std::string(MOEFORGE_PYTHON) + " " + MOEFORGE_SOURCE_DIR +
                                          "/scripts/interop/hf_mixtral_forward.py " + quote(dir) + " " +
                                          quote(tok) + " " + quote(out) + " 2>&1",
                                      &rc);
  EXPECT_EQ(rc, 0) << log;
  std::ifstream in(out);
  auto j = json::parse(in);
  std::vector<double> flat;
  for (auto& row : j["logits"])
    for (auto& v : row) flat.push_back(v.get<double>());
  return torch::tensor(flat, torch::kDouble).view({int64_t(j["logits"].size()), -1});
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Every tensor of an HF folder (single file or shards), by name.
std::map<std::string, torch::Tensor> folder_tensors(const fs::path& d) {
  std::map<std::string, torch::Tensor> out;
  for (auto& e : fs::directory_iterator(d))
    if (e.path().extension() == ".safetensors")
      for (auto& [n, t] : read_safetensors(e.path().string()).tensors) out[n] = t;
  return out;
}

class HfInterop : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Layer 0 dense, layer 1 MoE, untied head (docs/interop.md: dense layers become identical experts).
    ckpt_ = new std::string(
        test::train_cli("hf", test::interop_overrides({"model.moe_every=2", "model.tie_embeddings=false"})));
  }
  static void TearDownTestSuite() { delete ckpt_; }
  static std::string* ckpt_;
};
std::string* HfInterop::ckpt_ = nullptr;

std::string export_hf(const std::string& ckpt, const std::string& out, const std::string& dtype = "f32",
                      uint64_t shard = 0) {
  ExportOptions o;
  o.checkpoint = ckpt;
  o.format = "hf";
  o.out = out;
  o.dtype = dtype;
  o.max_shard_bytes = shard;
  std::ostringstream log;
  export_checkpoint(o, log);
  return log.str();
}

TEST_F(HfInterop, IndependentReaderComputesMoeforgeLogits) {
  auto lm = load_model(*ckpt_);
  const std::string dir = fresh_dir("hf_logits") + "/hf";
  export_hf(*ckpt_, dir, "f32", /*shard=*/64 << 10);  // small shards: the index.json path is read too
  ASSERT_TRUE(fs::exists(dir + "/model.safetensors.index.json"));
  auto cfg = json::parse(read_bytes(dir + "/config.json"));
  EXPECT_EQ(cfg["architectures"][0], "MixtralForCausalLM");
  EXPECT_EQ(cfg["num_local_experts"], 4);
  EXPECT_EQ(cfg["num_experts_per_tok"], 2);
  EXPECT_EQ(cfg["tie_word_embeddings"], false);
  for (auto f : {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"})
    EXPECT_TRUE(fs::exists(fs::path(dir) / f)) << f;
  const auto tokens = probe_tokens(lm);
  const double d = (moeforge_logits(lm, tokens) - python_logits(dir, tokens)).abs().max().item<double>();
  std::cout << "HF Mixtral reader (float64) vs moeforge (float32): max |logit difference| = " << d << "\n";
  // moeforge runs in float32 (relative rounding ~6e-8 per op) against float64; logits are O(10) after two
  // layers, so ~1e-6 is expected; 1e-4 still fails any layout, RoPE or gate mistake (> 1e-2).
  EXPECT_LT(d, 1e-4);
}

TEST_F(HfInterop, ExportImportExportIsByteIdentical) {
  const std::string root = fresh_dir("hf_roundtrip");
  export_hf(*ckpt_, root + "/a");
  std::ostringstream log;
  import_hf(root + "/a", root + "/ckpt", log);
  export_hf(root + "/ckpt", root + "/b");
  auto a = folder_tensors(root + "/a"), b = folder_tensors(root + "/b");
  ASSERT_EQ(a.size(), b.size());
  for (auto& [name, t] : a) {
    ASSERT_TRUE(b.count(name)) << name;
    ASSERT_EQ(t.sizes(), b[name].sizes()) << name;
    EXPECT_EQ(0, std::memcmp(t.data_ptr(), b[name].data_ptr(), t.nbytes())) << name;
  }
  EXPECT_EQ(read_bytes(root + "/a/tokenizer.model"), read_bytes(root + "/b/tokenizer.model"));
  // The imported checkpoint computes what the original does (its dense layer is now 4 identical experts).
  auto orig = load_model(*ckpt_), back = load_model(root + "/ckpt");
  const auto tokens = probe_tokens(orig);
  EXPECT_LT((moeforge_logits(orig, tokens) - moeforge_logits(back, tokens)).abs().max().item<double>(),
            1e-5);  // float32, only the summation order of the experts' halves differs
}

TEST_F(HfInterop, Bf16AndF16AreConvertedOnImport) {
  for (const std::string dt : {"bf16", "f16"}) {
    const std::string root = fresh_dir("hf_" + dt);
    export_hf(*ckpt_, root + "/a", dt);
    std::ostringstream log;
    import_hf(root + "/a", root + "/ckpt", log);
    auto orig = load_model(*ckpt_), back = load_model(root + "/ckpt");
    const auto type = dt == "bf16" ? torch::kBFloat16 : torch::kHalf;
    // The embedding came back as the rounded values, exactly (bf16 and f16 are subsets of float32).
    EXPECT_TRUE(torch::equal(back.model->embedding, orig.model->embedding.to(type).to(torch::kFloat))) << dt;
  }
}

// A dense Llama folder with grouped-query attention, made here: import, then the independent reader and
// moeforge agree (keys and values are repeated per query head on import).
TEST_F(HfInterop, DenseLlamaWithGqaImports) {
  auto lm = load_model(*ckpt_);
  const std::string root = fresh_dir("hf_llama"), dir = root + "/llama";
  fs::create_directories(dir);
  const int64_t V = lm.tokenizer->vocab_size(), C = 32, H = 4, Hkv = 2, D = C / H, F = 40, L = 2;
  json cfg = {{"architectures", {"LlamaForCausalLM"}},
              {"model_type", "llama"},
              {"vocab_size", V},
              {"hidden_size", C},
              {"intermediate_size", F},
              {"num_hidden_layers", L},
              {"num_attention_heads", H},
              {"num_key_value_heads", Hkv},
              {"max_position_embeddings", 64},
              {"rms_norm_eps", 1e-6},
              {"rope_theta", 500000.0},
              {"tie_word_embeddings", true},
              {"hidden_act", "silu"}};
  std::ofstream(dir + "/config.json") << cfg.dump(2);
  std::ofstream(dir + "/tokenizer.model", std::ios::binary) << lm.tokenizer->serialized();
  torch::manual_seed(3);
  std::vector<std::pair<std::string, torch::Tensor>> t = {
      {"model.embed_tokens.weight", torch::randn({V, C}).to(torch::kBFloat16)},
      {"model.norm.weight", 1 + 0.1 * torch::randn({C})}};
  for (int64_t i = 0; i < L; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    t.push_back({p + "input_layernorm.weight", 1 + 0.1 * torch::randn({C})});
    t.push_back({p + "post_attention_layernorm.weight", 1 + 0.1 * torch::randn({C})});
    t.push_back({p + "self_attn.q_proj.weight", 0.2 * torch::randn({H * D, C})});
    t.push_back({p + "self_attn.k_proj.weight", 0.2 * torch::randn({Hkv * D, C})});
    t.push_back({p + "self_attn.v_proj.weight", 0.2 * torch::randn({Hkv * D, C})});
    t.push_back({p + "self_attn.o_proj.weight", 0.2 * torch::randn({C, H * D})});
    t.push_back({p + "mlp.gate_proj.weight", 0.2 * torch::randn({F, C})});
    t.push_back({p + "mlp.up_proj.weight", 0.2 * torch::randn({F, C})});
    t.push_back({p + "mlp.down_proj.weight", (0.2 * torch::randn({C, F})).to(torch::kHalf)});
  }
  write_safetensors(dir + "/model.safetensors", t);
  int rc = 0;
  const std::string out = run_capture(std::string(MOEFORGE_CLI) + " import --format hf --from " + quote(dir) +
                                          " --out " + quote(root + "/ckpt") + " 2>&1",
                                      &rc);
  ASSERT_EQ(rc, 0) << out;
  auto back = load_model(root + "/ckpt");
  EXPECT_EQ(back.cfg.model.moe_every, 0);
  const auto tokens = probe_tokens(lm);
  const double d = (moeforge_logits(back, tokens) - python_logits(dir, tokens)).abs().max().item<double>();
  std::cout << "imported Llama (GQA) vs the reader: max |logit difference| = " << d << "\n";
  EXPECT_LT(d, 1e-4);  // float32 against float64, as in IndependentReaderComputesMoeforgeLogits
}

// A Qwen2-MoE folder made here (transformers' modeling_qwen2_moe.py layout): q/k/v biases, GQA, layer 0
// dense (decoder_sparse_step 2), layer 1 sparse with 4 experts top-2 not renormalised (norm_topk_prob false)
// and a shared expert twice the expert width behind its sigmoid gate. Import, then the independent reader and
// moeforge agree; the imported checkpoint generates in one process.
void write_qwen2_moe(const std::string& dir, int64_t V, const std::string& tokenizer, json extra = {}) {
  fs::create_directories(dir);
  const int64_t C = 32, H = 4, Hkv = 2, D = C / H, E = 4, F = 16, Fs = 32, Fd = 40, L = 2;
  json cfg = {{"architectures", {"Qwen2MoeForCausalLM"}},
              {"model_type", "qwen2_moe"},
              {"vocab_size", V},
              {"hidden_size", C},
              {"intermediate_size", Fd},
              {"moe_intermediate_size", F},
              {"shared_expert_intermediate_size", Fs},
              {"num_experts", E},
              {"num_experts_per_tok", 2},
              {"norm_topk_prob", false},
              {"decoder_sparse_step", 2},
              {"mlp_only_layers", json::array()},
              {"num_hidden_layers", L},
              {"num_attention_heads", H},
              {"num_key_value_heads", Hkv},
              {"max_position_embeddings", 64},
              {"rms_norm_eps", 1e-6},
              {"rope_theta", 1000000.0},
              {"tie_word_embeddings", false},
              {"use_sliding_window", false},
              {"hidden_act", "silu"}};
  for (auto& [k, v] : extra.items()) cfg[k] = v;
  std::ofstream(dir + "/config.json") << cfg.dump(2);
  std::ofstream(dir + "/tokenizer.model", std::ios::binary) << tokenizer;
  torch::manual_seed(5);
  std::vector<std::pair<std::string, torch::Tensor>> t = {
      {"model.embed_tokens.weight", torch::randn({V, C}).to(torch::kBFloat16)},
      {"lm_head.weight", 0.2 * torch::randn({V, C})},
      {"model.norm.weight", 1 + 0.1 * torch::randn({C})}};
  for (int64_t i = 0; i < L; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    t.push_back({p + "input_layernorm.weight", 1 + 0.1 * torch::randn({C})});
    t.push_back({p + "post_attention_layernorm.weight", 1 + 0.1 * torch::randn({C})});
    t.push_back({p + "self_attn.q_proj.weight", 0.2 * torch::randn({H * D, C})});
    t.push_back({p + "self_attn.q_proj.bias", 0.2 * torch::randn({H * D})});
    t.push_back({p + "self_attn.k_proj.weight", 0.2 * torch::randn({Hkv * D, C})});
    t.push_back({p + "self_attn.k_proj.bias", 0.2 * torch::randn({Hkv * D})});
    t.push_back({p + "self_attn.v_proj.weight", 0.2 * torch::randn({Hkv * D, C})});
    t.push_back({p + "self_attn.v_proj.bias", 0.2 * torch::randn({Hkv * D})});
    t.push_back({p + "self_attn.o_proj.weight", 0.2 * torch::randn({C, H * D})});
    auto mlp = [&](const std::string& q, int64_t width) {
      t.push_back({q + "gate_proj.weight", 0.2 * torch::randn({width, C})});
      t.push_back({q + "up_proj.weight", 0.2 * torch::randn({width, C})});
      t.push_back({q + "down_proj.weight", (0.2 * torch::randn({C, width})).to(torch::kHalf)});
    };
    if (i == 0) {
      mlp(p + "mlp.", Fd);
      continue;
    }
    t.push_back({p + "mlp.gate.weight", 0.5 * torch::randn({E, C})});
    for (int64_t e = 0; e < E; ++e) mlp(p + "mlp.experts." + std::to_string(e) + ".", F);
    mlp(p + "mlp.shared_expert.", Fs);
    t.push_back({p + "mlp.shared_expert_gate.weight", 0.5 * torch::randn({1, C})});
  }
  write_safetensors(dir + "/model.safetensors", t);
}

TEST_F(HfInterop, Qwen2MoeImports) {
  auto lm = load_model(*ckpt_);
  const std::string root = fresh_dir("hf_qwen2_moe"), dir = root + "/qwen";
  write_qwen2_moe(dir, lm.tokenizer->vocab_size(), lm.tokenizer->serialized());
  int rc = 0;
  std::string out = run_capture(std::string(MOEFORGE_CLI) + " import --format hf --from " + quote(dir) +
                                    " --out " + quote(root + "/ckpt") + " 2>&1",
                                &rc);
  ASSERT_EQ(rc, 0) << out;
  auto back = load_model(root + "/ckpt");
  EXPECT_TRUE(back.cfg.model.attn_bias);
  EXPECT_EQ(back.cfg.model.moe_every, 2);
  EXPECT_EQ(back.cfg.model.d_ff, 40);
  EXPECT_EQ(back.cfg.moe.n_shared_expert, 2);  // 32 wide = 2 experts of moe_intermediate_size 16
  EXPECT_TRUE(back.cfg.moe.shared_gate);
  EXPECT_FALSE(back.cfg.moe.renormalize);
  const auto tokens = probe_tokens(lm);
  const double d = (moeforge_logits(back, tokens) - python_logits(dir, tokens)).abs().max().item<double>();
  std::cout << "imported Qwen2-MoE vs the reader: max |logit difference| = " << d << "\n";
  EXPECT_LT(d, 1e-4);  // float32 against float64, as in IndependentReaderComputesMoeforgeLogits
  // Left out, the shared expert's gate changes the logits far beyond that bound (negative control).
  {
    torch::NoGradGuard ng;
    for (auto& layer : back.model->moe_layers()) layer->shared_gate.fill_(0);  // sigmoid(0) = 1/2
  }
  EXPECT_GT((moeforge_logits(back, tokens) - python_logits(dir, tokens)).abs().max().item<double>(), 1e-2);
  out = run_capture(std::string(MOEFORGE_CLI) + " generate --temperature 0 --max-tokens 4 --checkpoint " +
                        quote(root + "/ckpt") + " --prompt " + quote("the dog") + " 2>&1",
                    &rc);
  EXPECT_EQ(rc, 0) << out;
  // Neither export format has q/k/v biases or a gated shared expert: a clear error naming the key.
  for (const std::string fmt : {"gguf", "hf"}) try {
      to_mixtral(load_model(root + "/ckpt"), fmt);
      ADD_FAILURE() << "a Qwen2-MoE import exported to " << fmt;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("model.attn_bias"), std::string::npos) << e.what();
    }
}

TEST_F(HfInterop, Qwen2MoeFoldersMoeforgeCannotBuildAreErrorsNamingTheKey) {
  auto lm = load_model(*ckpt_);
  const std::string root = fresh_dir("hf_qwen2_moe_bad");
  const std::vector<std::pair<json, std::string>> cases = {
      {{{"shared_expert_intermediate_size", 24}}, "shared_expert_intermediate_size"},
      {{{"mlp_only_layers", {0}}}, "mlp_only_layers"},
      {{{"use_sliding_window", true}}, "use_sliding_window"},
      {{{"num_experts_per_tok", 1}, {"norm_topk_prob", true}}, "norm_topk_prob"}};
  int n = 0;
  for (auto& [extra, key] : cases) {
    const std::string dir = root + "/" + std::to_string(n++);
    write_qwen2_moe(dir, lm.tokenizer->vocab_size(), lm.tokenizer->serialized(), extra);
    std::ostringstream log;
    try {
      import_hf(dir, dir + "_ckpt", log);
      ADD_FAILURE() << key << ": imported";
    } catch (const FileError& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("config.json"), std::string::npos) << e.what();
    }
  }
}

// Bad folders: each is an error naming the file (and the tensor), never a crash.
TEST_F(HfInterop, BadFoldersAreErrorsNamingFileAndTensor) {
  const std::string root = fresh_dir("hf_bad");
  export_hf(*ckpt_, root + "/good");
  auto expect_error = [&](const std::string& name, const std::function<void(const fs::path&)>& spoil,
                          std::vector<std::string> must_name) {
    const fs::path d = fs::path(root) / name;
    fs::copy(root + "/good", d, fs::copy_options::recursive);
    spoil(d);
    std::ostringstream log;
    try {
      import_hf(d.string(), (fs::path(root) / (name + "_ckpt")).string(), log);
      ADD_FAILURE() << name << ": imported";
    } catch (const FileError& e) {
      for (auto& s : must_name)
        EXPECT_NE(std::string(e.what()).find(s), std::string::npos) << name << ": " << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << name << ": not an error naming the file: " << e.what();
    }
  };
  auto edit_config = [](const std::function<void(json&)>& f) {
    return [f](const fs::path& d) {
      auto c = json::parse(read_bytes(d / "config.json"));
      f(c);
      std::ofstream(d / "config.json", std::ios::trunc) << c.dump();
    };
  };
  // Keys of the wrong JSON type are named (they were a JSON library exception), a context that would make
  // the RoPE table huge is refused before anything is built, as is a configuration moeforge cannot build.
  expect_error("model_type_number", edit_config([](json& c) { c["model_type"] = 7; }),
               {"config.json", "model_type", "not a string"});
  expect_error("bias_string", edit_config([](json& c) { c["attention_bias"] = "no"; }),
               {"config.json", "attention_bias"});
  expect_error("huge_context", edit_config([](json& c) { c["max_position_embeddings"] = int64_t{1} << 40; }),
               {"config.json", "max_position_embeddings", "1099511627776"});
  expect_error("experts_used", edit_config([](json& c) { c["num_experts_per_tok"] = 99; }),
               {"config.json", "cannot build", "n_expert_used"});
  expect_error("index_escape",
               [](const fs::path& d) {
                 std::ofstream(d / "model.safetensors.index.json") << R"({"weight_map": {"x": ".."}})";
               },
               {"model.safetensors.index.json", "outside the folder", ".."});
  // A shard that is a link out of the folder is refused, as a checkpoint manifest refuses names outside
  // its folder (docs/reliability.md, "Shared folders and limits").
  expect_error("shard_link",
               [](const fs::path& d) {
                 const fs::path outside = d.parent_path() / "shard_link_outside.safetensors";
                 fs::rename(d / "model.safetensors", outside);
                 fs::create_symlink(outside, d / "model.safetensors");
               },
               {"model.safetensors", "outside the folder"});
  const std::string st = "model.safetensors";
  expect_error("garbled_config",
               [](const fs::path& d) { std::ofstream(d / "config.json") << "{\"model_type\": "; },
               {"config.json", "JSON"});
  expect_error("unknown_arch",
               [](const fs::path& d) {
                 auto c = json::parse(read_bytes(d / "config.json"));
                 c["model_type"] = "gpt2";
                 std::ofstream(d / "config.json") << c.dump();
               },
               {"config.json", "gpt2"});
  expect_error("truncated", [&](const fs::path& d) { fs::resize_file(d / st, fs::file_size(d / st) / 2); },
               {st});
  expect_error("garbled_header",
               [&](const fs::path& d) {
                 auto b = read_bytes(d / st);
                 for (size_t i = 8; i < 40; ++i) b[i] = '#';
                 std::ofstream(d / st, std::ios::binary) << b;
               },
               {st});
  auto rewrite = [&](const fs::path& d, const std::function<void(SafeTensors&)>& f) {
    auto s = read_safetensors((d / st).string());
    f(s);
    write_safetensors((d / st).string(), s.tensors);
  };
  const std::string router = "model.layers.1.block_sparse_moe.gate.weight";
  expect_error("missing_tensor",
               [&](const fs::path& d) {
                 rewrite(d, [&](SafeTensors& s) {
                   s.tensors.erase(std::remove_if(s.tensors.begin(), s.tensors.end(),
                                                  [&](auto& p) { return p.first == router; }),
                                   s.tensors.end());
                 });
               },
               {router, "missing"});
  expect_error("wrong_shape",
               [&](const fs::path& d) {
                 rewrite(d, [&](SafeTensors& s) {
                   for (auto& p : s.tensors)
                     if (p.first == router) p.second = torch::zeros({3, 32});
                 });
               },
               {router, "shape", st});
  expect_error("wrong_dtype",
               [&](const fs::path& d) {
                 rewrite(d, [&](SafeTensors& s) {
                   for (auto& p : s.tensors)
                     if (p.first == router) p.second = torch::zeros({4, 32}, torch::kLong);
                 });
               },
               {router, "dtype"});
  expect_error("garbled_tokenizer",
               [](const fs::path& d) { std::ofstream(d / "tokenizer.model") << "\xff\xff\xff not a model"; },
               {"tokenizer.model"});
  expect_error("no_weights", [&](const fs::path& d) { fs::remove(d / st); }, {"model.safetensors"});
}

}  // namespace
