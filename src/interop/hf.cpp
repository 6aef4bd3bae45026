#include "moeforge/interop/hf.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "moeforge/interop/spm_proto.h"
#include "moeforge/io/safetensors.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace moeforge {
namespace {

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw FileError(p.string(), "missing or unreadable");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

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

namespace {

// The safetensors of a folder by tensor name (with the file each came from, for errors).
struct HfWeights {
  std::map<std::string, std::pair<torch::Tensor, std::string>> t;
  std::set<std::string> used;
  torch::Tensor take(const std::string& name, std::vector<int64_t> shape, const std::string& dir) {
    auto it = t.find(name);
    if (it == t.end()) throw FileError(dir, "tensor '" + name + "' is missing");
    const auto& [x, file] = it->second;
    if (x.sizes().vec() != shape)
      throw FileError(file, "tensor '" + name + "' has shape " + c10::str(x.sizes()) +
                                ", config.json implies " + c10::str(c10::IntArrayRef(shape)));
    const auto st = x.scalar_type();
    if (st != torch::kFloat && st != torch::kHalf && st != torch::kBFloat16 && st != torch::kDouble)
      throw FileError(file, "tensor '" + name + "' has dtype " + std::string(c10::toString(st)) +
                                " (expected F32, F16 or BF16)");
    used.insert(name);
    return x.to(torch::kFloat).contiguous();
  }
};

HfWeights read_hf_weights(const fs::path& d) {
  HfWeights w;
  std::vector<std::string> files;
  if (fs::exists(d / "model.safetensors.index.json")) {
    const fs::path ip = d / "model.safetensors.index.json";
    json index;
    try {
      index = json::parse(read_all(ip));
    } catch (const json::exception& e) {
      throw FileError(ip.string(), std::string("not valid JSON: ") + e.what());
    }
    if (!index.contains("weight_map") || !index["weight_map"].is_object())
      throw FileError(ip.string(), "has no weight_map object");
    std::set<std::string> names;
    for (auto& [k, v] : index["weight_map"].items()) {
      if (!v.is_string()) throw FileError(ip.string(), "weight_map['" + k + "'] is not a file name");
      names.insert(v.get<std::string>());
    }
    files.assign(names.begin(), names.end());
  } else if (fs::exists(d / "model.safetensors")) {
    files = {"model.safetensors"};
  } else {
    throw FileError(d.string(), "has neither model.safetensors nor model.safetensors.index.json");
  }
  for (auto& f : files) {
    const fs::path p = d / f;
    if (p.filename() != fs::path(f) || f.find('/') != std::string::npos)
      throw FileError((d / "model.safetensors.index.json").string(), "names a file outside the folder: " + f);
    auto st = read_safetensors(p.string());
    for (auto& [name, t] : st.tensors) {
      if (w.t.count(name))
        throw FileError(p.string(), "tensor '" + name + "' is also in " + w.t[name].second);
      w.t[name] = {t, p.string()};
    }
  }
  return w;
}

int64_t get_int(const json& c, const char* key, const std::string& where, int64_t fallback = -1) {
  if (!c.contains(key) || c[key].is_null()) {
    if (fallback >= 0) return fallback;
    throw FileError(where, std::string("has no '") + key + "'");
  }
  if (!c[key].is_number_integer() || c[key].get<int64_t>() < 0)
    throw FileError(where, std::string("'") + key + "' is not a non-negative integer");
  return c[key].get<int64_t>();
}

double get_num(const json& c, const char* key, const std::string& where, double fallback) {
  if (!c.contains(key) || c[key].is_null()) return fallback;
  if (!c[key].is_number()) throw FileError(where, std::string("'") + key + "' is not a number");
  return c[key].get<double>();
}

}  // namespace

void import_hf(const std::string& dir, const std::string& out, std::ostream& log) {
  const fs::path d(dir);
  const std::string cp = (d / "config.json").string();
  json c;
  try {
    c = json::parse(read_all(d / "config.json"));
  } catch (const json::exception& e) {
    throw FileError(cp, std::string("not valid JSON: ") + e.what());
  }
  if (!c.is_object()) throw FileError(cp, "is not a JSON object");
  const std::string type = c.value("model_type", std::string());
  if (type != "llama" && type != "mixtral")
    throw FileError(
        cp, "model_type '" + type +
                "' is not one moeforge imports (llama, mixtral; docs/interop.md says why not qwen2_moe)");
  const bool moe = type == "mixtral";
  MixtralModel m;
  m.vocab_size = get_int(c, "vocab_size", cp);
  m.d_model = get_int(c, "hidden_size", cp);
  m.n_head = get_int(c, "num_attention_heads", cp);
  m.n_kv_head = get_int(c, "num_key_value_heads", cp, m.n_head);
  m.d_ff = get_int(c, "intermediate_size", cp);
  const int64_t n_layer = get_int(c, "num_hidden_layers", cp);
  m.context = get_int(c, "max_position_embeddings", cp);
  m.n_expert = moe ? get_int(c, "num_local_experts", cp) : 1;
  m.n_expert_used = moe ? get_int(c, "num_experts_per_tok", cp) : 1;
  m.rope_theta = get_num(c, "rope_theta", cp, 10000.0);
  m.norm_eps = get_num(c, "rms_norm_eps", cp, 1e-6);
  if (m.n_head == 0 || m.d_model % m.n_head != 0)
    throw FileError(cp, "hidden_size is not a multiple of num_attention_heads");
  if (m.n_kv_head == 0 || m.n_head % m.n_kv_head != 0)
    throw FileError(cp, "num_attention_heads is not a multiple of num_key_value_heads");
  if (get_int(c, "head_dim", cp, m.head_dim()) != m.head_dim())
    throw FileError(cp,
                    "head_dim differs from hidden_size / num_attention_heads (moeforge has no such heads)");
  if (c.value("hidden_act", std::string("silu")) != "silu")
    throw FileError(cp,
                    "hidden_act '" + c.value("hidden_act", std::string()) + "' (moeforge's FFNs are SwiGLU)");
  if (c.contains("rope_scaling") && !c["rope_scaling"].is_null())
    throw FileError(cp, "rope_scaling is set; moeforge's RoPE has no scaling");
  if (c.value("attention_bias", false) || c.value("mlp_bias", false))
    throw FileError(cp, "attention_bias / mlp_bias: moeforge's projections have no biases");
  const bool tied = c.value("tie_word_embeddings", false);

  const std::string tok_path = (d / "tokenizer.model").string();
  m.tokenizer_model = read_all(tok_path);
  const auto spm = parse_spm_model(m.tokenizer_model, tok_path);
  if (int64_t(spm.pieces.size()) != m.vocab_size)
    throw FileError(tok_path, "has " + std::to_string(spm.pieces.size()) +
                                  " pieces, config.json's vocab_size is " + std::to_string(m.vocab_size));

  auto w = read_hf_weights(d);
  const int64_t C = m.d_model, D = m.head_dim(), V = m.vocab_size, F = m.d_ff, E = m.n_expert;
  m.embedding = w.take("model.embed_tokens.weight", {V, C}, dir);
  m.final_norm = w.take("model.norm.weight", {C}, dir);
  if (!tied)
    m.head = w.take("lm_head.weight", {V, C}, dir);
  else if (w.t.count("lm_head.weight"))
    w.used.insert("lm_head.weight");  // a copy of the embedding
  for (int64_t i = 0; i < n_layer; ++i) {
    MixtralLayer L;
    const std::string p = "model.layers." + std::to_string(i) + ".";
    L.attn_norm = w.take(p + "input_layernorm.weight", {C}, dir);
    L.wq = w.take(p + "self_attn.q_proj.weight", {m.n_head * D, C}, dir);
    L.wk = w.take(p + "self_attn.k_proj.weight", {m.n_kv_head * D, C}, dir);
    L.wv = w.take(p + "self_attn.v_proj.weight", {m.n_kv_head * D, C}, dir);
    L.wo = w.take(p + "self_attn.o_proj.weight", {C, m.n_head * D}, dir);
    L.ffn_norm = w.take(p + "post_attention_layernorm.weight", {C}, dir);
    if (moe) {
      L.router = w.take(p + "block_sparse_moe.gate.weight", {E, C}, dir);
      std::vector<torch::Tensor> g, u, dn;
      for (int64_t e = 0; e < E; ++e) {
        const std::string q = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
        g.push_back(w.take(q + "w1.weight", {F, C}, dir));
        dn.push_back(w.take(q + "w2.weight", {C, F}, dir));
        u.push_back(w.take(q + "w3.weight", {F, C}, dir));
      }
      L.w_gate = torch::stack(g);
      L.w_up = torch::stack(u);
      L.w_down = torch::stack(dn);
    } else {
      L.router = torch::zeros({1, C});
      L.w_gate = w.take(p + "mlp.gate_proj.weight", {F, C}, dir).unsqueeze(0);
      L.w_up = w.take(p + "mlp.up_proj.weight", {F, C}, dir).unsqueeze(0);
      L.w_down = w.take(p + "mlp.down_proj.weight", {C, F}, dir).unsqueeze(0);
    }
    m.layers.push_back(std::move(L));
  }
  for (auto& [name, t] : w.t)
    if (!w.used.count(name) && name.find("rotary_emb.inv_freq") == std::string::npos)
      throw FileError(t.second, "unexpected tensor '" + name + "' (not part of a " + type + " model)");
  check_mixtral_shapes(m, dir);

  // The moeforge model: GQA keys and values are repeated per query head (what HF's repeat_kv computes).
  RunConfig cfg;
  cfg.model.d_model = C;
  cfg.model.n_layer = n_layer;
  cfg.model.n_head = m.n_head;
  cfg.model.tie_embeddings = tied;
  cfg.model.rope_theta = m.rope_theta;
  cfg.model.norm_eps = m.norm_eps;
  cfg.data.vocab_size = V;
  cfg.data.seq_len = m.context;
  if (moe) {
    cfg.model.moe_every = 1;
    cfg.moe.router = "topk";
    cfg.moe.n_expert = E;
    cfg.moe.n_expert_used = m.n_expert_used;
    cfg.moe.d_expert = F;
    cfg.moe.renormalize = true;
    cfg.moe.capacity_factor = 0;
    cfg.moe.balance_coef = get_num(c, "router_aux_loss_coef", cp, cfg.moe.balance_coef);
  } else {
    cfg.model.moe_every = 0;
    cfg.model.d_ff = F;
  }
  cfg.validate();
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
    blk->attn->w_out.copy_(L.wo);
    if (blk->moe) {
      blk->moe->router->named_parameters(false)["weight"].copy_(L.router);
      blk->moe->experts->w_gate.copy_(L.w_gate);
      blk->moe->experts->w_up.copy_(L.w_up);
      blk->moe->experts->w_down.copy_(L.w_down);
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
  log << "imported " << type << " (" << n_layer << " layers, "
      << (moe ? std::to_string(E) + " experts" : "dense") << ", " << m.n_kv_head << " key/value heads"
      << (m.n_kv_head < m.n_head ? " repeated per query head" : "") << ") into " << out << "\n";
}

}  // namespace moeforge
