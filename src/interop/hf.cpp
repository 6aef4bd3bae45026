#include "moeforge/interop/hf.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "moeforge/interop/spm_proto.h"
#include "moeforge/io/safetensors.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/load.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace moeforge {
namespace {

std::string piece_or(const SpmModelInfo& spm, int64_t id, const std::string& fallback) {
  return id >= 0 && id < int64_t(spm.pieces.size()) ? spm.pieces[size_t(id)].piece : fallback;
}

using Named = std::vector<std::pair<std::string, torch::Tensor>>;

Named hf_tensors(const MixtralModel& m, torch::ScalarType dt) {
  Named t;
  auto add = [&](const std::string& name, const torch::Tensor& x) {
    t.push_back({name, x.to(dt).contiguous()});
  };
  add("model.embed_tokens.weight", m.embedding);
  for (int64_t i = 0; i < m.n_layer(); ++i) {
    const auto& L = m.layers[size_t(i)];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    add(p + "input_layernorm.weight", L.attn_norm);
    // Hugging Face's Llama/Mixtral RoPE is rotate_half, moeforge's half-split pairs: no permutation.
    add(p + "self_attn.q_proj.weight", L.wq);
    add(p + "self_attn.k_proj.weight", L.wk);
    add(p + "self_attn.v_proj.weight", L.wv);
    add(p + "self_attn.o_proj.weight", L.wo);
    add(p + "post_attention_layernorm.weight", L.ffn_norm);
    add(p + "block_sparse_moe.gate.weight", L.router);
    for (int64_t e = 0; e < m.n_expert; ++e) {
      const std::string q = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      add(q + "w1.weight", L.w_gate[e]);  // gate  [F, C]
      add(q + "w2.weight", L.w_down[e]);  // down  [C, F]
      add(q + "w3.weight", L.w_up[e]);    // up    [F, C]
    }
  }
  add("model.norm.weight", m.final_norm);
  if (m.head.defined()) add("lm_head.weight", m.head);
  return t;
}

}  // namespace

void write_hf(const std::string& dir, const MixtralModel& m, const HfExportOptions& opt) {
  const torch::ScalarType dt =
      opt.dtype == "f16"    ? torch::kHalf
      : opt.dtype == "bf16" ? torch::kBFloat16
      : opt.dtype == "f32"  ? torch::kFloat
                            : throw ConfigError("--dtype", "'" + opt.dtype + "' is not f32, f16 or bf16");
  const auto spm = parse_spm_model(m.tokenizer_model, "tokenizer.model");
  fs::create_directories(dir);
  const fs::path d(dir);
  json cfg = {{"architectures", {"MixtralForCausalLM"}},
              {"model_type", "mixtral"},
              {"vocab_size", m.vocab_size},
              {"hidden_size", m.d_model},
              {"intermediate_size", m.d_ff},
              {"num_hidden_layers", m.n_layer()},
              {"num_attention_heads", m.n_head},
              {"num_key_value_heads", m.n_kv_head},
              {"head_dim", m.head_dim()},
              {"hidden_act", "silu"},
              {"max_position_embeddings", m.context},
              {"rms_norm_eps", m.norm_eps},
              {"rope_theta", m.rope_theta},
              {"rope_scaling", nullptr},
              {"sliding_window", nullptr},
              {"attention_dropout", 0.0},
              {"tie_word_embeddings", !m.head.defined()},
              {"num_local_experts", m.n_expert},
              {"num_experts_per_tok", m.n_expert_used},
              {"router_aux_loss_coef", opt.router_aux_loss_coef},
              {"output_router_logits", false},
              {"initializer_range", 0.02},
              {"use_cache", true},
              {"bos_token_id", spm.bos_id},
              {"eos_token_id", spm.eos_id},
              {"torch_dtype", opt.dtype == "f16"    ? "float16"
                              : opt.dtype == "bf16" ? "bfloat16"
                                                    : "float32"}};
  write_file_atomic((d / "config.json").string(), cfg.dump(2) + "\n");

  // Weights: one file, or shards of at most max_shard_bytes each with an index (as save_pretrained does).
  const Named tensors = hf_tensors(m, dt);
  uint64_t total = 0;
  for (auto& t : tensors) total += t.second.nbytes();
  std::vector<Named> shards(1);
  uint64_t in_shard = 0;
  for (auto& t : tensors) {
    if (in_shard > 0 && in_shard + t.second.nbytes() > opt.max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(t);
    in_shard += t.second.nbytes();
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"}};
  // Remove what an earlier export with other sharding left.
  for (auto& e : fs::directory_iterator(d))
    if (e.path().filename().string().rfind("model", 0) == 0 && e.path().extension() == ".safetensors")
      fs::remove(e.path());
  fs::remove(d / "model.safetensors.index.json");
  if (shards.size() == 1) {
    write_safetensors((d / "model.safetensors").string(), shards[0], meta);
  } else {
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", json::object()}};
    char name[64];
    for (size_t s = 0; s < shards.size(); ++s) {
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
      write_safetensors((d / name).string(), shards[s], meta);
      for (auto& t : shards[s]) index["weight_map"][t.first] = name;
    }
    write_file_atomic((d / "model.safetensors.index.json").string(), index.dump(2) + "\n");
  }

  write_file_atomic((d / "tokenizer.model").string(), m.tokenizer_model);
  const std::string bos = piece_or(spm, spm.bos_id, "<s>"), eos = piece_or(spm, spm.eos_id, "</s>"),
                    unk = piece_or(spm, spm.unk_id, "<unk>");
  json tc = {{"tokenizer_class", "LlamaTokenizer"},
             {"bos_token", bos},
             {"eos_token", eos},
             {"unk_token", unk},
             {"pad_token", nullptr},
             {"add_bos_token", true},  // moeforge prepends <s> to every prompt
             {"add_eos_token", false},
             {"legacy", true},
             {"clean_up_tokenization_spaces", false},
             {"model_max_length", m.context},
             {"sp_model_kwargs", json::object()}};
  write_file_atomic((d / "tokenizer_config.json").string(), tc.dump(2) + "\n");
  json st = {{"bos_token", bos}, {"eos_token", eos}, {"unk_token", unk}};
  write_file_atomic((d / "special_tokens_map.json").string(), st.dump(2) + "\n");
}

void import_hf(const std::string& dir, const std::string& out, std::ostream& log) {
  HfModel hf = read_hf(dir);
  const MixtralModel& m = hf.model;
  RunConfig& cfg = hf.cfg;
  const bool tied = hf.tied, moe = hf.moe;
  const int64_t C = m.d_model, D = m.head_dim(), V = m.vocab_size, n_layer = m.n_layer();
  // The moeforge model: GQA keys and values are repeated per query head (what HF's repeat_kv computes).
  auto model = build_model(cfg, V);
  torch::NoGradGuard ng;
  model->embedding.copy_(m.embedding);
  model->final_norm->weight.copy_(m.final_norm);
  if (!tied) model->head.copy_(m.head);
  const int64_t group = m.n_head / m.n_kv_head;
  auto expand_kv = [&](const torch::Tensor& t) {  // [Hkv*D, C] -> [H*D, C]
    return t.view({m.n_kv_head, 1, D, C}).expand({m.n_kv_head, group, D, C}).reshape({m.n_head * D, C});
  };
  for (int64_t i = 0; i < n_layer; ++i) {
    auto* blk = model->blocks[i]->as<BlockImpl>();
    const auto& L = m.layers[size_t(i)];
    blk->attn_norm->weight.copy_(L.attn_norm);
    blk->ffn_norm->weight.copy_(L.ffn_norm);
    blk->attn->w_qkv.copy_(torch::cat({L.wq, expand_kv(L.wk), expand_kv(L.wv)}, 0));
    if (L.bq.defined()) {
      auto expand_b = [&](const torch::Tensor& b) {  // [Hkv*D] -> [H*D]
        return b.view({m.n_kv_head, 1, D}).expand({m.n_kv_head, group, D}).reshape({m.n_head * D});
      };
      blk->attn->b_qkv.copy_(torch::cat({L.bq, expand_b(L.bk), expand_b(L.bv)}, 0));
    }
    blk->attn->w_out.copy_(L.wo);
    if (blk->moe) {
      blk->moe->router->named_parameters(false)["weight"].copy_(L.router);
      blk->moe->experts->w_gate.copy_(L.w_gate);
      blk->moe->experts->w_up.copy_(L.w_up);
      blk->moe->experts->w_down.copy_(L.w_down);
      if (L.sh_gate.defined()) {
        blk->moe->shared->w_gate.copy_(L.sh_gate);
        blk->moe->shared->w_up.copy_(L.sh_up);
        blk->moe->shared->w_down.copy_(L.sh_down);
        blk->moe->shared_gate.copy_(L.sh_gate_w);
      }
    } else if (L.dense) {
      blk->ffn->w_gate.copy_(L.dense_gate);
      blk->ffn->w_up.copy_(L.dense_up);
      blk->ffn->w_down.copy_(L.dense_down);
    } else {
      blk->ffn->w_gate.copy_(L.w_gate[0]);
      blk->ffn->w_up.copy_(L.w_up[0]);
      blk->ffn->w_down.copy_(L.w_down[0]);
    }
  }
  Checkpoint ck;
  ck.config_toml = cfg.to_toml();
  ck.tokenizer_model = m.tokenizer_model;
  ck.model = module_state(*model);
  ck.trainer_meta = {{"imported_from", dir}};
  save_checkpoint(out, ck);
  log << "imported " << hf.type << " (" << n_layer << " layers, "
      << (moe ? std::to_string(m.n_expert) + " experts" : "dense")
      << (m.n_shared > 0 ? ", " + std::to_string(m.n_shared) + " shared" : "") << ", " << m.n_kv_head
      << " key/value heads" << (m.n_kv_head < m.n_head ? " repeated per query head" : "") << ") into " << out
      << "\n";
}

}  // namespace moeforge
