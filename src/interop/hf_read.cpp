// Reading a Hugging Face folder (config.json, tokenizer.model, safetensors) into the Mixtral form: the
// part of `moeforge import` that meets the hostile input, kept free of the model so that the fuzz target
// fuzz_hf reaches it alone (docs/reliability.md, docs/interop.md).
#include <array>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "moeforge/interop/hf.h"
#include "moeforge/interop/spm_proto.h"
#include "moeforge/io/safetensors.h"
#include "moeforge/util/error.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace moeforge {
namespace {

// A file of the import folder may not be a link that leads out of it (as a checkpoint's manifest may name
// nothing outside its folder): the import reads what the folder holds, not what it points at.
void check_inside(const fs::path& p) {
  std::error_code ec;
  if (!fs::is_symlink(p, ec)) return;
  const fs::path real = fs::weakly_canonical(p, ec);
  const fs::path root = fs::weakly_canonical(p.parent_path(), ec);
  const std::string r = root.string() + "/";
  if (real.string().compare(0, r.size(), r) != 0)
    throw FileError(p.string(), "is a link to " + real.string() + ", outside the folder " + root.string() +
                                    ": copy the file into the folder instead");
}

std::string read_all(const fs::path& p) {
  check_inside(p);
  std::ifstream in(p, std::ios::binary);
  if (!in) throw FileError(p.string(), "missing or unreadable");
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

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
    if (f.empty() || f == "." || f == ".." || p.filename() != fs::path(f) || f.find('/') != std::string::npos)
      throw FileError((d / "model.safetensors.index.json").string(), "names a file outside the folder: " + f);
    check_inside(p);
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

std::string get_str(const json& c, const char* key, const std::string& where, const std::string& fallback) {
  if (!c.contains(key) || c[key].is_null()) return fallback;
  if (!c[key].is_string()) throw FileError(where, std::string("'") + key + "' is not a string");
  return c[key].get<std::string>();
}

bool get_bool(const json& c, const char* key, const std::string& where) {
  if (!c.contains(key) || c[key].is_null()) return false;
  if (!c[key].is_boolean()) throw FileError(where, std::string("'") + key + "' is not true or false");
  return c[key].get<bool>();
}

// A SwiGLU FFN's three projections of width F under `prefix` (Llama/Qwen names gate_proj, up_proj,
// down_proj; Mixtral's experts w1, w3, w2): [F, C], [F, C], [C, F].
struct SwiGLUNames {
  const char *gate, *up, *down;
};
constexpr SwiGLUNames kLlamaNames{"gate_proj", "up_proj", "down_proj"}, kMixtralNames{"w1", "w3", "w2"};

std::array<torch::Tensor, 3> take_swiglu(HfWeights& w, const std::string& prefix, const SwiGLUNames& n,
                                         int64_t F, int64_t C, const std::string& dir) {
  return {w.take(prefix + n.gate + ".weight", {F, C}, dir), w.take(prefix + n.up + ".weight", {F, C}, dir),
          w.take(prefix + n.down + ".weight", {C, F}, dir)};
}

// A router [E, C] and E experts under `prefix` + "experts.<e>.", stacked into the layer.
void take_moe(MixtralLayer& L, HfWeights& w, const std::string& prefix, const SwiGLUNames& n, int64_t E,
              int64_t F, int64_t C, const std::string& dir) {
  L.router = w.take(prefix + "gate.weight", {E, C}, dir);
  std::vector<torch::Tensor> g, u, dn;
  for (int64_t e = 0; e < E; ++e) {
    auto t = take_swiglu(w, prefix + "experts." + std::to_string(e) + ".", n, F, C, dir);
    g.push_back(t[0]);
    u.push_back(t[1]);
    dn.push_back(t[2]);
  }
  L.w_gate = torch::stack(g);
  L.w_up = torch::stack(u);
  L.w_down = torch::stack(dn);
}

}  // namespace

HfModel read_hf(const std::string& dir) {
  const fs::path d(dir);
  const std::string cp = (d / "config.json").string();
  json c;
  try {
    c = json::parse(read_all(d / "config.json"));
  } catch (const json::exception& e) {
    throw FileError(cp, std::string("not valid JSON: ") + e.what());
  }
  if (!c.is_object()) throw FileError(cp, "is not a JSON object");
  const std::string type = get_str(c, "model_type", cp, "");
  if (type != "llama" && type != "mixtral" && type != "qwen2_moe")
    throw FileError(cp, "model_type '" + type + "' is not one moeforge imports (llama, mixtral, qwen2_moe)");
  const bool qwen = type == "qwen2_moe";
  MixtralModel m;
  m.vocab_size = get_int(c, "vocab_size", cp);
  m.d_model = get_int(c, "hidden_size", cp);
  m.n_head = get_int(c, "num_attention_heads", cp);
  m.n_kv_head = get_int(c, "num_key_value_heads", cp, m.n_head);
  m.d_ff = get_int(c, "intermediate_size", cp);
  const int64_t n_layer = get_int(c, "num_hidden_layers", cp);
  m.context = get_int(c, "max_position_embeddings", cp);
  // Qwen2-MoE (transformers' modeling_qwen2_moe.py): layer i is sparse when (i + 1) % decoder_sparse_step
  // == 0 (moeforge's model.moe_every) and not in mlp_only_layers; its MoE block is softmax top-K (divided
  // by the sum only with norm_topk_prob) plus one shared expert of shared_expert_intermediate_size behind
  // sigmoid(shared_expert_gate x); q, k, v projections have biases.
  int64_t sparse_step = 1;
  if (qwen) {
    m.form = "qwen2_moe";
    m.d_ff_dense = m.d_ff;
    m.n_expert = get_int(c, "num_experts", cp);
    m.n_expert_used = get_int(c, "num_experts_per_tok", cp);
    m.d_ff = get_int(c, "moe_intermediate_size", cp);
    m.norm_topk = get_bool(c, "norm_topk_prob", cp);
    sparse_step = get_int(c, "decoder_sparse_step", cp, 1);
    if (sparse_step < 1) throw FileError(cp, "'decoder_sparse_step' must be >= 1");
    if (c.contains("mlp_only_layers") && !c["mlp_only_layers"].is_null() &&
        !(c["mlp_only_layers"].is_array() && c["mlp_only_layers"].empty()))
      throw FileError(cp,
                      "mlp_only_layers is not empty; moeforge places dense layers by model.moe_every only");
    if (get_bool(c, "use_sliding_window", cp))
      throw FileError(cp, "use_sliding_window is true; moeforge's attention sees the whole context");
    const int64_t shared_width = get_int(c, "shared_expert_intermediate_size", cp, 0);
    if (m.d_ff == 0 || shared_width % m.d_ff != 0)
      throw FileError(cp, "shared_expert_intermediate_size " + std::to_string(shared_width) +
                              " is not a multiple of moe_intermediate_size " + std::to_string(m.d_ff) +
                              " (moeforge's shared experts are moe.d_expert wide each)");
    m.n_shared = shared_width / m.d_ff;
    // moeforge's K = 1 gate is the chosen probability p; renormalised it would be 1.
    if (m.n_expert_used == 1 && m.norm_topk)
      throw FileError(cp,
                      "num_experts_per_tok = 1 with norm_topk_prob = true (gate 1): moeforge's top-1 gate "
                      "is the probability p");
  } else {
    m.n_expert = type == "mixtral" ? get_int(c, "num_local_experts", cp) : 1;
    m.n_expert_used = type == "mixtral" ? get_int(c, "num_experts_per_tok", cp) : 1;
  }
  const bool moe = type != "llama";
  m.rope_theta = get_num(c, "rope_theta", cp, 10000.0);
  m.norm_eps = get_num(c, "rms_norm_eps", cp, 1e-6);
  if (m.n_head == 0 || m.d_model % m.n_head != 0)
    throw FileError(cp, "hidden_size is not a multiple of num_attention_heads");
  if (m.n_kv_head == 0 || m.n_head % m.n_kv_head != 0)
    throw FileError(cp, "num_attention_heads is not a multiple of num_key_value_heads");
  if (get_int(c, "head_dim", cp, m.head_dim()) != m.head_dim())
    throw FileError(cp,
                    "head_dim differs from hidden_size / num_attention_heads (moeforge has no such heads)");
  if (const auto act = get_str(c, "hidden_act", cp, "silu"); act != "silu")
    throw FileError(cp, "hidden_act '" + act + "' (moeforge's FFNs are SwiGLU)");
  if (c.contains("rope_scaling") && !c["rope_scaling"].is_null())
    throw FileError(cp, "rope_scaling is set; moeforge's RoPE has no scaling");
  if (get_bool(c, "attention_bias", cp) || get_bool(c, "mlp_bias", cp))
    throw FileError(cp, "attention_bias / mlp_bias: moeforge's Llama projections have no biases");
  const bool tied = get_bool(c, "tie_word_embeddings", cp);
  // The RoPE table moeforge builds has max_position_embeddings rows before any weight is read
  // (data.seq_len's bound, docs/reliability.md).
  if (m.context < 1 || m.context > (int64_t{1} << 20))
    throw FileError(cp, "max_position_embeddings " + std::to_string(m.context) +
                            " is outside [1, 1048576] (moeforge's bound on the context)");

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
    if (qwen) {
      L.bq = w.take(p + "self_attn.q_proj.bias", {m.n_head * D}, dir);
      L.bk = w.take(p + "self_attn.k_proj.bias", {m.n_kv_head * D}, dir);
      L.bv = w.take(p + "self_attn.v_proj.bias", {m.n_kv_head * D}, dir);
      if ((i + 1) % sparse_step != 0) {
        L.dense = true;
        auto [g, u, dn] = take_swiglu(w, p + "mlp.", kLlamaNames, m.d_ff_dense, C, dir);
        L.dense_gate = g, L.dense_up = u, L.dense_down = dn;
      } else {
        take_moe(L, w, p + "mlp.", kLlamaNames, E, F, C, dir);
        if (m.n_shared > 0) {
          auto [g, u, dn] = take_swiglu(w, p + "mlp.shared_expert.", kLlamaNames, m.n_shared * F, C, dir);
          L.sh_gate = g, L.sh_up = u, L.sh_down = dn;
          L.sh_gate_w = w.take(p + "mlp.shared_expert_gate.weight", {1, C}, dir);
        }
      }
    } else if (moe) {
      take_moe(L, w, p + "block_sparse_moe.", kMixtralNames, E, F, C, dir);
    } else {
      L.router = torch::zeros({1, C});
      auto [g, u, dn] = take_swiglu(w, p + "mlp.", kLlamaNames, F, C, dir);
      L.w_gate = g.unsqueeze(0), L.w_up = u.unsqueeze(0), L.w_down = dn.unsqueeze(0);
    }
    m.layers.push_back(std::move(L));
  }
  for (auto& [name, t] : w.t)
    if (!w.used.count(name) && name.find("rotary_emb.inv_freq") == std::string::npos)
      throw FileError(t.second, "unexpected tensor '" + name + "' (not part of a " + type + " model)");
  check_mixtral_shapes(m, dir);

  HfModel out;
  RunConfig& cfg = out.cfg;
  cfg.model.d_model = C;
  cfg.model.n_layer = n_layer;
  cfg.model.n_head = m.n_head;
  cfg.model.tie_embeddings = tied;
  cfg.model.rope_theta = m.rope_theta;
  cfg.model.norm_eps = m.norm_eps;
  cfg.data.vocab_size = V;
  cfg.data.seq_len = m.context;
  if (moe) {
    cfg.model.moe_every = sparse_step;
    cfg.moe.router = "topk";
    cfg.moe.n_expert = E;
    cfg.moe.n_expert_used = m.n_expert_used;
    cfg.moe.d_expert = F;
    cfg.moe.renormalize = m.norm_topk;
    cfg.moe.capacity_factor = 0;
    cfg.moe.balance_coef = get_num(c, "router_aux_loss_coef", cp, cfg.moe.balance_coef);
    if (qwen) {
      cfg.model.attn_bias = true;
      cfg.model.d_ff = m.d_ff_dense;
      cfg.moe.n_shared_expert = m.n_shared;
      cfg.moe.shared_gate = m.n_shared > 0;
    }
  } else {
    cfg.model.moe_every = 0;
    cfg.model.d_ff = F;
  }
  try {
    cfg.validate();
  } catch (const ConfigError& e) {
    throw FileError(cp, std::string("describes a model moeforge cannot build: ") + e.what());
  }
  out.type = type;
  out.moe = moe;
  out.tied = tied;
  out.model = std::move(m);
  return out;
}

void check_mixtral_shapes(const MixtralModel& m, const std::string& where) {
  const int64_t V = m.vocab_size, C = m.d_model, D = m.head_dim(), E = m.n_expert, F = m.d_ff;
  auto check = [&](const torch::Tensor& t, std::vector<int64_t> want, const std::string& name) {
    if (!t.defined()) throw FileError(where, "tensor '" + name + "' is missing");
    if (t.sizes().vec() != want)
      throw FileError(where, "tensor '" + name + "' has shape " + c10::str(t.sizes()) + ", expected " +
                                 c10::str(c10::IntArrayRef(want)));
  };
  check(m.embedding, {V, C}, "embedding");
  check(m.final_norm, {C}, "final norm");
  if (m.head.defined()) check(m.head, {V, C}, "output head");
  for (int64_t i = 0; i < m.n_layer(); ++i) {
    const auto& L = m.layers[size_t(i)];
    const std::string p = "layer " + std::to_string(i) + " ";
    check(L.attn_norm, {C}, p + "attention norm");
    check(L.wq, {m.n_head * D, C}, p + "q");
    check(L.wk, {m.n_kv_head * D, C}, p + "k");
    check(L.wv, {m.n_kv_head * D, C}, p + "v");
    check(L.wo, {C, m.n_head * D}, p + "attention output");
    check(L.ffn_norm, {C}, p + "ffn norm");
    if (L.dense) {
      const int64_t Fd = m.d_ff_dense;
      check(L.dense_gate, {Fd, C}, p + "dense gate");
      check(L.dense_up, {Fd, C}, p + "dense up");
      check(L.dense_down, {C, Fd}, p + "dense down");
      continue;
    }
    check(L.router, {E, C}, p + "router");
    check(L.w_gate, {E, F, C}, p + "expert gate");
    check(L.w_up, {E, F, C}, p + "expert up");
    check(L.w_down, {E, C, F}, p + "expert down");
    if (m.form == "deepseek" || (m.form == "qwen2_moe" && m.n_shared > 0)) {
      const int64_t Fs = m.n_shared * F;
      check(L.sh_gate, {Fs, C}, p + "shared gate");
      check(L.sh_up, {Fs, C}, p + "shared up");
      check(L.sh_down, {C, Fs}, p + "shared down");
    }
  }
}

}  // namespace moeforge
