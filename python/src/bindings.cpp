// moeforge._C: the C++ library as PyTorch sees it (docs/python.md). Kept to what LibTorch 1.13 and 2.x both
// have: the torch extension API, pybind11, and moeforge's own headers. The Python package (moeforge/) wraps
// these in nn.Modules; every tensor here is the C++ module's own, so PyTorch's optimisers, state_dict and
// autograd see the same storage and the same gradients.
#include <torch/extension.h>

#include <sstream>

#include "moeforge/config/binder.h"
#include "moeforge/config/run_config.h"
#include "moeforge/data/prepare.h"
#include "moeforge/layer/moe_layer.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/model/generate.h"
#include "moeforge/model/inference_precision.h"
#include "moeforge/model/load.h"
#include "moeforge/routing/measures.h"
#include "moeforge/routing/registry.h"
#include "moeforge/train/optim.h"
#include "moeforge/train/trainer.h"
#include "moeforge/util/error.h"
#include "moeforge/util/runtime.h"

namespace py = pybind11;
using namespace moeforge;

namespace {

using Named = std::vector<std::pair<std::string, torch::Tensor>>;

// A module's parameters and buffers, with their dotted names (recursive), as Python lists.
Named named_parameters_of(const torch::nn::Module& m) {
  Named out;
  for (const auto& p : m.named_parameters()) out.push_back({p.key(), p.value()});
  return out;
}
Named named_buffers_of(const torch::nn::Module& m) {
  Named out;
  for (const auto& b : m.named_buffers()) out.push_back({b.key(), b.value()});
  return out;
}

// The [moe] section from "moe.<key>=<toml value>" overrides on the defaults; validated.
MoEConfig moe_config_of(const std::vector<std::string>& overrides) {
  MoEConfig cfg;
  ConfigBinder b;
  bind_moe_config(b, &cfg);
  for (const auto& o : overrides) b.apply_override(o);
  cfg.validate();
  return cfg;
}

// The [train] section from "train.<key>=<toml value>" overrides on the defaults; validated.
TrainConfig train_config_of(const std::vector<std::string>& overrides) {
  TrainConfig tc;
  ConfigBinder b;
  bind_train_config(b, &tc);
  for (const auto& o : overrides) b.apply_override(o);
  tc.validate();
  return tc;
}

// Every [moe] key with its current value, as TOML literals ("moe.<key>" -> "value").
std::map<std::string, std::string> moe_keys(const MoEConfig& cfg) {
  ConfigBinder b;
  bind_moe_config(b, const_cast<MoEConfig*>(&cfg));
  std::map<std::string, std::string> out;
  std::istringstream in(b.to_toml());
  for (std::string line; std::getline(in, line);) {
    const auto eq = line.find(" = ");
    if (line.empty() || line[0] == '[' || eq == std::string::npos) continue;
    out["moe." + line.substr(0, eq)] = line.substr(eq + 3);
  }
  return out;
}

// The registry as Python sees it: for each router, its summary and its own keys with their defaults.
py::list router_table() {
  py::list out;
  MoEConfig defaults;
  const auto all = moe_keys(defaults);
  for (const auto& spec : router_registry()) {
    ConfigBinder own;
    MoEConfig scratch;
    if (spec.bind) spec.bind(own, &scratch);
    py::dict options;
    for (const auto& key : own.keys()) options[py::str(key.substr(4))] = all.at(key);
    py::dict row;
    row["name"] = spec.name;
    row["summary"] = spec.summary;
    row["options"] = options;
    out.append(row);
  }
  return out;
}

// The common [moe] keys (every router's), with their defaults.
py::dict common_keys() {
  MoEConfig defaults;
  auto all = moe_keys(defaults);
  for (const auto& spec : router_registry()) {
    ConfigBinder own;
    MoEConfig scratch;
    if (spec.bind) spec.bind(own, &scratch);
    for (const auto& key : own.keys()) all.erase(key);
  }
  py::dict out;
  for (const auto& [k, v] : all) out[py::str(k.substr(4))] = v;
  return out;
}

py::dict stats_dict(const RoutingStats& s) {
  py::dict d;
  d["load"] = s.load;
  d["n_tokens"] = s.n_tokens;
  d["n_requested"] = s.n_requested;
  d["n_kept"] = s.n_kept;
  d["max_vio"] = s.max_vio;
  d["dropped_share"] = s.dropped_share;
  d["load_cv"] = s.load_cv;
  d["load_entropy"] = s.load_entropy;
  d["dead_experts"] = s.dead_experts;
  d["n_balanced"] = s.n_balanced;
  d["group_load"] = s.group_load;
  return d;
}

// A shape, dtype or device the layer cannot take, as the ValueError / TypeError that names it.
void check_input(const torch::Tensor& x, int64_t d_model, const torch::Tensor& like) {
  if (x.dim() != 2 && x.dim() != 3)
    throw py::value_error("x must be [B, S, C] or [T, C], got " + std::to_string(x.dim()) + " dimensions");
  if (x.size(-1) != d_model)
    throw py::value_error("x's last dimension must be d_model = " + std::to_string(d_model) + ", got " +
                          std::to_string(x.size(-1)));
  if (!x.is_floating_point())
    throw py::type_error("x must be a floating-point tensor, got " + std::string(toString(x.scalar_type())));
  if (x.scalar_type() != like.scalar_type())
    throw py::type_error("x is " + std::string(toString(x.scalar_type())) + ", the layer's weights are " +
                         toString(like.scalar_type()) + " (move the module with .to(dtype) first)");
  if (x.device() != like.device())
    throw py::value_error("x is on " + x.device().str() + ", the layer on " + like.device().str());
}

// One MoE layer (router -> dispatch -> experts -> combine) as Python holds it.
struct Layer {
  MoELayer layer{nullptr};
  int64_t d_model = 0;

  Layer(const std::vector<std::string>& overrides, int64_t d) : d_model(d) {
    if (d < 1) throw py::value_error("d_model must be >= 1, got " + std::to_string(d));
    layer = MoELayer(moe_config_of(overrides), d);
  }

  // x [B, S, C] or [T, C]; with given expert weights (the Mixtral block's stacked per-expert parameters),
  // those are used for this call instead of the layer's own.
  std::pair<torch::Tensor, RoutingPlan> forward(const torch::Tensor& x,
                                                const c10::optional<torch::Tensor>& prompt_len, bool training,
                                                const c10::optional<torch::Tensor>& w_gate,
                                                const c10::optional<torch::Tensor>& w_up,
                                                const c10::optional<torch::Tensor>& w_down) {
    const auto params = layer->parameters();
    check_input(x, d_model, params.empty() ? x : params.front());
    layer->train(training);
    RouteContext ctx;
    if (prompt_len) {
      if (x.dim() != 3 || prompt_len->numel() != x.size(0))
        throw py::value_error("prompt_len needs x as [B, S, C] and one length per sequence");
      ctx.prompt_len = prompt_len->to(torch::kCPU, torch::kLong);
    }
    const bool swap = w_up.has_value();
    torch::Tensor keep_gate, keep_up, keep_down;
    if (swap) {
      auto& e = layer->experts;
      if (!e) throw py::value_error("expert weights given to a layer without FFN experts");
      keep_gate = e->w_gate, keep_up = e->w_up, keep_down = e->w_down;
      e->w_gate = w_gate ? *w_gate : torch::Tensor();
      e->w_up = *w_up;
      e->w_down = *w_down;
    }
    MoEOutput out;
    try {
      out = layer->forward(x, ctx);
    } catch (...) {
      if (swap)
        layer->experts->w_gate = keep_gate, layer->experts->w_up = keep_up,
        layer->experts->w_down = keep_down;
      throw;
    }
    if (swap)
      layer->experts->w_gate = keep_gate, layer->experts->w_up = keep_up, layer->experts->w_down = keep_down;
    return {out.y, std::move(out.plan)};
  }
};

// A whole model (transformer LM) with its config and tokenizer.
struct Model {
  LoadedModel lm;
};

// A checkpoint, its matrix weights stored in bf16 when `dtype` says so (model/inference_precision.h).
Model load_as(const std::string& dir, const std::string& dtype) {
  Model mm{load_model(dir)};
  if (inference_precision(dtype, mm.lm.cfg.train.precision, read_cpu_features(), "dtype") ==
      MatmulPrecision::kBFloat16)
    store_weights_bf16(*mm.lm.model);
  return mm;
}

Model build(const std::string& config_text, const std::vector<std::string>& overrides, int64_t vocab_size,
            uint64_t seed) {
  Model m;
  m.lm.cfg =
      load_run_config_text(config_text.empty() ? default_config_text() : config_text, "config", overrides);
  torch::manual_seed(seed);
  m.lm.model = build_model(m.lm.cfg, vocab_size);
  return m;
}

void save(Model& m, const std::string& dir, int64_t step) {
  if (!m.lm.tokenizer) throw py::value_error("this model has no tokenizer (build it from data first)");
  Checkpoint c;
  c.step = step;
  c.config_toml = m.lm.cfg.to_toml();
  c.tokenizer_model = m.lm.tokenizer->serialized();
  c.model = module_state(*m.lm.model);
  c.trainer = {{"rng.cpu", torch::zeros({1})}};
  c.trainer_meta = {{"step", std::to_string(step)}};
  save_checkpoint(dir, c);
}

// Data of a run config: its packed splits and tokenizer, and the trainer's batch order.
struct Data {
  DataBundle bundle;
};

// moeforge's errors as Python's: an unknown key a KeyError, a wrong type a TypeError, a bad value a
// ValueError, an unreadable file an OSError (docs/python.md).
void translate_errors() {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ConfigError& e) {
      const std::string w = e.what();
      if (w.find("unknown key") != std::string::npos)
        PyErr_SetString(PyExc_KeyError, w.c_str());
      else if (w.find("expected") != std::string::npos)
        PyErr_SetString(PyExc_TypeError, w.c_str());
      else
        PyErr_SetString(PyExc_ValueError, w.c_str());
    } catch (const FileError& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    }
  });
}

// The routers and the MoE layer: the registry, RoutingPlan, Layer and the routing measures.
void bind_routing(py::module_& m) {
  m.def("routers", &router_table, "every registered router with its own options and their defaults");
  m.def("common_options", &common_keys, "the [moe] keys every router reads, with their defaults");
  m.def("init_threads", &init_threads, py::arg("n") = 0);

  py::class_<RoutingPlan>(m, "RoutingPlan")
      .def_readonly("token_index", &RoutingPlan::token_index)
      .def_readonly("expert_offsets", &RoutingPlan::expert_offsets)
      .def_readonly("gate", &RoutingPlan::gate)
      .def_readonly("aux_loss", &RoutingPlan::aux_loss)
      .def_readonly("scores", &RoutingPlan::scores)
      .def_property_readonly("stats", [](const RoutingPlan& p) { return stats_dict(p.stats); });

  py::class_<Layer>(m, "Layer")
      .def(py::init<const std::vector<std::string>&, int64_t>())
      .def("forward", &Layer::forward, py::arg("x"), py::arg("prompt_len") = py::none(),
           py::arg("training") = true, py::arg("w_gate") = py::none(), py::arg("w_up") = py::none(),
           py::arg("w_down") = py::none())
      .def("named_parameters", [](const Layer& l) { return named_parameters_of(*l.layer); })
      .def("named_buffers", [](const Layer& l) { return named_buffers_of(*l.layer); })
      .def("after_step", [](Layer& l) { l.layer->after_step(); })
      .def("add_token_loss", [](Layer& l, const torch::Tensor& t) { l.layer->add_token_loss(t); })
      .def("router_name", [](const Layer& l) { return l.layer->router->name(); })
      .def("causal", [](const Layer& l) { return l.layer->router->causal(); })
      .def("describe_state", [](const Layer& l) { return l.layer->router->describe_state().dump(); })
      .def("token_clusters",
           [](const Layer& l, const RoutingPlan& p) { return l.layer->router->token_clusters(p); })
      .def("assignment_scores",
           [](Layer& l, const torch::Tensor& x, const RoutingPlan& p) {
             torch::NoGradGuard ng;
             return l.layer->router->assignment_scores(x.reshape({-1, x.size(-1)}), p);
           })
      .def("causal_leak",
           [](Layer& l, const torch::Tensor& x, bool training) {
             torch::NoGradGuard ng;
             l.layer->train(training);
             const auto r = causal_leak(*l.layer, x);
             return py::make_tuple(r.same_row, r.other_rows, r.trials);
           })
      .def("config", [](const Layer& l) { return moe_keys(l.layer->config()); });

  m.def(
      "optimality_gap",
      [](const torch::Tensor& scores, const RoutingPlan& plan, int64_t k, int64_t cap) {
        const auto g = optimality_gap(scores, plan, k, cap);
        return py::make_tuple(g.optimum, g.router_objective, g.gap, g.capacity_violation);
      },
      py::arg("scores"), py::arg("plan"), py::arg("k"), py::arg("cap"));
  m.def("max_violation", [](const std::vector<double>& load) { return max_violation(load); });
  m.def("specialisation", [](const torch::Tensor& counts) {
    const auto s = domain_specialisation(counts.to(torch::kCPU, torch::kDouble));
    return py::make_tuple(s.mi_over_h, s.purity);
  });
}

// Whole language models: load (also with bf16-stored weights), build, forward, generate, save.
void bind_model(py::module_& m) {
  py::class_<Model>(m, "Model")
      .def_static("load", &load_as, py::arg("dir"), py::arg("dtype") = "fp32")
      .def_static("build", &build, py::arg("config_text"), py::arg("overrides"), py::arg("vocab_size"),
                  py::arg("seed"))
      .def(
          "forward",
          [](Model& mm, const torch::Tensor& tokens, bool training,
             const c10::optional<torch::Tensor>& prompt_len) {
            if (tokens.dim() != 2 || tokens.scalar_type() != torch::kLong)
              throw py::value_error("tokens must be an int64 tensor [B, S]");
            mm.lm.model->train(training);
            RouteContext ctx;
            if (prompt_len) ctx.prompt_len = prompt_len->to(torch::kCPU, torch::kLong);
            auto out = mm.lm.model->forward(tokens, ctx);
            return py::make_tuple(out.logits, out.aux_loss, out.plans);
          },
          py::arg("tokens"), py::arg("training") = false, py::arg("prompt_len") = py::none())
      .def("named_parameters", [](const Model& mm) { return named_parameters_of(*mm.lm.model); })
      .def("named_buffers", [](const Model& mm) { return named_buffers_of(*mm.lm.model); })
      .def("after_step", [](Model& mm) { mm.lm.model->after_step(); })
      .def("add_token_loss", [](Model& mm, const torch::Tensor& t) { mm.lm.model->add_token_loss(t); })
      .def("config_toml", [](const Model& mm) { return mm.lm.cfg.to_toml(); })
      .def("step", [](const Model& mm) { return mm.lm.step; })
      .def("set_tokenizer", [](Model& mm, const Data& d) { mm.lm.tokenizer = d.bundle.tokenizer; })
      .def("has_tokenizer", [](const Model& mm) { return mm.lm.tokenizer.has_value(); })
      .def("encode",
           [](const Model& mm, const std::string& text) {
             if (!mm.lm.tokenizer) throw py::value_error("this model has no tokenizer");
             auto ids = mm.lm.tokenizer->encode(text);
             ids.insert(ids.begin(), mm.lm.tokenizer->bos_id());
             return ids;
           })
      .def("decode",
           [](const Model& mm, const std::vector<int64_t>& ids) {
             if (!mm.lm.tokenizer) throw py::value_error("this model has no tokenizer");
             return mm.lm.tokenizer->decode(ids);
           })
      .def("eos_id", [](const Model& mm) { return mm.lm.tokenizer ? mm.lm.tokenizer->eos_id() : -1; })
      .def("generate",
           [](Model& mm, const std::vector<int64_t>& prompt, int64_t max_tokens, double temperature,
              double top_p, uint64_t seed, int64_t eos_id) {
             GenerateOptions g;
             g.max_tokens = max_tokens;
             g.temperature = temperature;
             g.top_p = top_p;
             g.seed = seed;
             g.eos_id = eos_id;
             try {
               return generate(mm.lm.model, prompt, g);
             } catch (const std::invalid_argument& e) {
               throw py::value_error(e.what());
             }
           })
      .def("save", &save, py::arg("dir"), py::arg("step") = 0)
      .def("moe_layer_count", [](const Model& mm) { return int64_t(mm.lm.model->moe_layers().size()); })
      .def("moe_layer_describe_state", [](const Model& mm, int64_t i) {
        return mm.lm.model->moe_layers().at(size_t(i))->router->describe_state().dump();
      });
}

// A run's data, the trainer's batches, AdamW and its schedule, clipping and the training loss.
void bind_training(py::module_& m) {
  py::class_<Data>(m, "Data")
      .def_static(
          "prepare",
          [](const std::string& config_text, const std::vector<std::string>& overrides,
             const c10::optional<std::string>& tokenizer_model) {
            auto cfg = load_run_config_text(config_text.empty() ? default_config_text() : config_text,
                                            "config", overrides);
            std::ostringstream log;
            Data d;
            d.bundle = prepare_data(cfg.data, tokenizer_model ? &*tokenizer_model : nullptr, log);
            return d;
          },
          py::arg("config_text"), py::arg("overrides"), py::arg("tokenizer_model") = py::none())
      .def_static("of_model",
                  [](const Model& mm) {
                    if (!mm.lm.tokenizer) throw py::value_error("this model has no tokenizer");
                    std::ostringstream log;
                    const std::string tok = mm.lm.tokenizer->serialized();
                    Data d;
                    d.bundle = prepare_data(mm.lm.cfg.data, &tok, log);
                    return d;
                  })
      .def("vocab_size", [](const Data& d) { return d.bundle.tokenizer->vocab_size(); })
      .def("split", [](const Data& d, const std::string& which) {
        const PackedData& p = which == "train"        ? d.bundle.train
                              : which == "validation" ? d.bundle.validation
                                                      : d.bundle.heldout;
        // Shards are read whole here: a split of a large corpus is better batched with Batcher.
        const PackedRows all = p.row_range(0, p.size());
        return py::make_tuple(all.tokens, all.domain, p.domains);
      });

  // The trainer's batch order (a seeded epoch shuffle, exact resume): the batches `moeforge train` draws.
  py::class_<Batcher>(m, "Batcher")
      .def(py::init([](const Data& d, int64_t batch_size, uint64_t seed) {
        return Batcher(d.bundle.train, batch_size, seed, /*shuffle=*/true);
      }))
      .def("next", [](Batcher& b) { return b.next().tokens; });

  // moeforge's AdamW (train/optim.h): decoupled weight decay on matrices, the trainer's exact update.
  py::class_<AdamW>(m, "AdamW")
      .def(py::init([](const Named& params, const std::vector<std::string>& overrides) {
        return AdamW(params, train_config_of(overrides));
      }))
      .def("step", &AdamW::step, py::arg("lr"))
      .def("zero_grad", &AdamW::zero_grad);
  m.def(
      "learning_rate",
      [](const std::vector<std::string>& overrides, int64_t step) {
        return learning_rate(train_config_of(overrides), step);
      },
      py::arg("overrides"), py::arg("step"));
  m.def("clip_grad_norm", &clip_grad_norm, py::arg("params"), py::arg("max_norm"));
  m.def(
      "training_loss",
      [](Model& mm, const torch::Tensor& tokens, bool training) {
        if (tokens.dim() != 2 || tokens.scalar_type() != torch::kLong)
          throw py::value_error("tokens must be an int64 tensor [B, S+1]");
        mm.lm.model->train(training);
        Batcher::Batch b;
        b.tokens = tokens;
        auto f = training_forward(mm.lm.model, b);
        return py::make_tuple(f.loss(), f.out.aux_loss, f.token_ce);
      },
      py::arg("model"), py::arg("tokens"), py::arg("training") = true);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moeforge's C++ core (docs/python.md)";
  translate_errors();
  bind_routing(m);
  bind_model(m);
  bind_training(m);
}
