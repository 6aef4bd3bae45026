#include "moeforge/train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <set>
#include <sstream>

#include "moeforge/dist/dist.h"
#include "moeforge/dist/expert_parallel.h"
#include "moeforge/dist/sync.h"
#include "moeforge/layer/moe_layer.h"
#include "moeforge/model/checkpoint.h"
#include "moeforge/train/clustering.h"
#include "moeforge/train/optim.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"
#include "moeforge/util/interrupt.h"
#include "moeforge/util/progress.h"
#include "moeforge/util/runtime.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

// The default CPU generator's state (noise in routers, sampling): saved so a resumed run draws the same.
torch::Tensor rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

std::string step_name(int64_t step) {
  std::ostringstream os;
  os << "step-" << std::setw(6) << std::setfill('0') << step;
  return os.str();
}

// Keeps the newest `keep` step-NNNNNN folders.
void prune_checkpoints(const fs::path& dir, int64_t keep) {
  std::vector<fs::path> steps;
  for (auto& e : fs::directory_iterator(dir))
    if (e.is_directory() && e.path().filename().string().rfind("step-", 0) == 0 &&
        e.path().filename().string().find(".tmp") == std::string::npos)
      steps.push_back(e.path());
  std::sort(steps.begin(), steps.end());
  for (size_t i = 0; i + size_t(keep) < steps.size(); ++i) fs::remove_all(steps[i]);
}

// FNV-1a over the int64 token ids of `tokens`.
uint64_t token_digest(const torch::Tensor& tokens) {
  auto t = tokens.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* p = t.data_ptr<int64_t>();
  uint64_t h = 1469598103934665603ull;
  for (int64_t i = 0; i < t.numel(); ++i) {
    h ^= uint64_t(p[i]);
    h *= 1099511628211ull;
  }
  return h;
}

// --set keys a resumed run may change (docs/reliability.md): how long it runs and how often it logs,
// evaluates and checkpoints; everything else would make the checkpoint's state mean something else.
const std::vector<std::string>& resumable_keys() {
  static const std::vector<std::string> k = {"train.steps", "train.eval_every", "train.eval_batches",
                                             "train.log_every", "train.checkpoint_every",
                                             "train.keep_checkpoints",
                                             // How the experts are laid out over ranks; checkpoints hold
                                             // every expert whatever it was (docs/distributed.md).
                                             "dist.expert_parallel"};
  return k;
}

// The checkpoint's configuration with the safe `overrides` applied; any other key is a ConfigError naming
// it, and a config the checkpoint's writer wrote that this build cannot read names that writer.
RunConfig resume_config(const Checkpoint& ckpt, const std::string& dir,
                        const std::vector<std::string>& overrides) {
  const std::string where = dir + "/config.toml";
  for (auto& o : overrides) {
    const std::string key = o.substr(0, o.find('='));
    const auto& ok = resumable_keys();
    if (std::find(ok.begin(), ok.end(), key) == ok.end()) {
      std::string list;
      for (auto& k : ok) list += (list.empty() ? "" : ", ") + k;
      throw ConfigError(key, "cannot be changed when resuming (--set " + o + "); a resumed run may change " +
                                 list + ". Start a new run, or --init from the checkpoint");
    }
  }
  RunConfig cfg;
  try {
    cfg = load_run_config_text(ckpt.config_toml, where);
  } catch (const ConfigError& e) {
    throw FileError(where, "written by " + ckpt.writer + ", not readable by moeforge " + moeforge_version() +
                               ": " + e.what());
  }
  cfg = load_run_config_text(ckpt.config_toml, where, overrides);
  if (cfg.train.steps <= ckpt.step)
    throw ConfigError("train.steps", std::to_string(cfg.train.steps) + " steps: the checkpoint " + dir +
                                         " is at step " + std::to_string(ckpt.step) +
                                         " already; pass --set train.steps=N with N > " +
                                         std::to_string(ckpt.step) + " to train further");
  return cfg;
}

// A non-negative integer counter from the checkpoint's trainer metadata, or a FileError naming it.
int64_t trainer_counter(const Checkpoint& ckpt, const std::string& dir, const std::string& key) {
  const std::string where = dir + "/trainer.safetensors";
  auto it = ckpt.trainer_meta.find(key);
  if (it == ckpt.trainer_meta.end()) throw FileError(where, "metadata has no '" + key + "'");
  const std::string& v = it->second;
  if (v.empty() || v.size() > 18 || v.find_first_not_of("0123456789") != std::string::npos)
    throw FileError(where, "metadata '" + key + "' = '" + v + "' is not a non-negative integer");
  return std::stoll(v);
}

// After a resume from step `step`, metrics.jsonl keeps only the rows written up to that step (the run
// that wrote the checkpoint may have gone on before it ended), so that every step and split has one row.
// A torn last line (the writer killed mid-line) is dropped too.
void truncate_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  while (std::getline(in, line)) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      continue;
    }
    if (j.is_object() && j.contains("step") && j["step"].is_number_integer() &&
        j["step"].get<int64_t>() <= step)
      kept += line + "\n";
  }
  in.close();
  write_file_atomic(path, kept);
}

// Rows [r*b, (r+1)*b) of a global batch of W*b sequences: this rank's contiguous slice (data
// parallelism, docs/distributed.md), rank 0 first, so the ranks' slices in rank order are the batch.
Batcher::Batch rank_slice(const Batcher::Batch& g, int rank, int world) {
  if (world == 1) return g;
  const int64_t b = g.tokens.size(0) / world;
  auto cut = [&](const torch::Tensor& t) { return t.defined() ? t.narrow(0, b * rank, b) : t; };
  return {cut(g.tokens), cut(g.domain), cut(g.cluster), cut(g.doc), cut(g.weight), cut(g.prompt_len)};
}

// Expert parallelism (docs/distributed.md): the names of the parameters this rank holds a shard of (its
// experts of every MoE layer), and the shard.
struct ExpertSharding {
  std::set<std::string> names;
  dist::ExpertShard shard;
  int64_t n_expert = 0;
  bool on() const { return !names.empty(); }
  // A parameter name, or an optimiser entry "adam.m.<name>" / "adam.v.<name>" of one.
  bool covers(const std::string& key) const {
    if (names.count(key)) return true;
    for (const char* pre : {"adam.m.", "adam.v."})
      if (key.rfind(pre, 0) == 0 && names.count(key.substr(std::string(pre).size()))) return true;
    return false;
  }
};

ExpertSharding expert_sharding(TransformerLM& model, int64_t n_expert) {
  ExpertSharding s;
  s.n_expert = n_expert;
  for (auto& m : model->named_modules()) {
    auto* layer = dynamic_cast<MoELayerImpl*>(m.value().get());
    if (layer == nullptr || !layer->experts_sharded()) continue;
    s.shard = layer->expert_shard();
    for (auto& p : layer->experts->named_parameters())
      s.names.insert((m.key().empty() ? "" : m.key() + ".") + "experts." + p.key());
  }
  return s;
}

// A checkpoint's full tensors [E, ...] of the sharded names cut to this rank's experts (load).
NamedTensors shard_state(const NamedTensors& full, const ExpertSharding& s, const std::string& where) {
  if (!s.on()) return full;
  NamedTensors out;
  for (const auto& [name, t] : full) {
    if (!s.covers(name)) {
      out.push_back({name, t});
      continue;
    }
    if (t.dim() < 1 || t.size(0) != s.n_expert)
      throw FileError(where, "'" + name + "' has " + std::to_string(t.dim() ? t.size(0) : 0) +
                                 " experts, not " + std::to_string(s.n_expert));
    out.push_back({name, t.narrow(0, s.shard.first, s.shard.count).clone()});
  }
  return out;
}

// The shards of the sharded names of this rank's expert group put back together [E, ...], on every rank
// (save; a collective).
NamedTensors gather_state(const NamedTensors& local, const ExpertSharding& s) {
  if (!s.on()) return local;
  NamedTensors out;
  for (const auto& [name, t] : local)
    out.push_back({name, s.covers(name)
                             ? dist::allgather_cat(t, "the expert shard " + name, dist::Group::kExperts)
                             : t});
  return out;
}

std::string fmt(double v, int precision = 4) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(precision) << v;
  return os.str();
}

}  // namespace

DataBundle prepare_data(const DataConfig& cfg, const std::string* tokenizer_model, std::ostream& log) {
  DataBundle d;
  if (cfg.corpus == "instruct") {
    const auto t0 = std::chrono::steady_clock::now();
    d.instruct = generate_instruct(cfg);
    d.split = instruct_corpus_split(*d.instruct, cfg);
    log << "instruct: " << d.instruct->tasks.size() << " tasks (" << d.instruct->heldout.size()
        << " held out), " << d.instruct->train.size() << "/" << d.instruct->validation.size() << "/"
        << d.instruct->test.size() << " samples (train/validation/test) ("
        << fmt(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1) << " s)\n";
  } else {
    d.split = split_corpus(load_corpus(cfg), cfg);
  }
  if (tokenizer_model) {
    d.tokenizer = Tokenizer::from_serialized(*tokenizer_model);
  } else {
    const auto t0 = std::chrono::steady_clock::now();
    d.tokenizer = train_or_load_tokenizer(d.split, cfg, (fs::path(cfg.dir) / "cache").string());
    log << "tokenizer: " << d.tokenizer->vocab_size() << " pieces ("
        << fmt(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1) << " s)\n";
  }
  if (d.instruct) {
    // `heldout` is the test samples of the held-out tasks (instruct_corpus_split); the trained tasks' test
    // samples are for the final evaluation only.
    std::vector<InstructSample> heldout;
    for (const auto& s : d.instruct->test)
      if (std::count(d.instruct->heldout.begin(), d.instruct->heldout.end(), s.task)) heldout.push_back(s);
    const auto& doms = d.split.domains;
    d.train = pack_samples(d.instruct->train, *d.tokenizer, cfg.seq_len, doms, cfg.instruct_pack);
    d.validation = pack_samples(d.instruct->validation, *d.tokenizer, cfg.seq_len, doms, cfg.instruct_pack);
    if (!heldout.empty())
      d.heldout = pack_samples(heldout, *d.tokenizer, cfg.seq_len, doms, cfg.instruct_pack);
    const int64_t dropped =
        d.train.dropped + d.validation.dropped + (heldout.empty() ? 0 : d.heldout.dropped);
    if (dropped > 0)
      log << "instruct: " << dropped << " samples longer than data.seq_len + 1 = " << cfg.seq_len + 1
          << " tokens left out (" << d.train.dropped << " of them training samples)\n";
  } else {
    d.train = pack_documents(d.split.train, *d.tokenizer, cfg.seq_len, d.split.domains);
    d.validation = pack_documents(d.split.validation, *d.tokenizer, cfg.seq_len, d.split.domains);
    if (!d.split.heldout.empty())
      d.heldout = pack_documents(d.split.heldout, *d.tokenizer, cfg.seq_len, d.split.domains);
  }
  log << "data: " << d.split.train.size() << "/" << d.split.validation.size() << "/" << d.split.heldout.size()
      << " documents (train/validation/held-out), " << d.train.size() << " training sequences of "
      << cfg.seq_len << " tokens\n";
  return d;
}

TransformerLM build_model(RunConfig& cfg, int64_t vocab_size) {
  cfg.model.vocab_size = vocab_size;
  cfg.model.max_seq_len = cfg.data.seq_len;
  return TransformerLM(cfg.model, cfg.moe);
}

void check_config_fits_model_file(const RunConfig& cfg, int64_t vocab_size, const NamedTensors& model,
                                  const std::string& where) {
  // In doubles: a hostile config's products may overflow int64; the bound only needs to be compared.
  const auto& m = cfg.model;
  const auto& moe = cfg.moe;
  const double C = double(m.d_model), V = double(vocab_size);
  double bound = V * C * (m.tie_embeddings ? 1.0 : 2.0);  // embedding (and an untied head)
  for (int64_t i = 0; i < m.n_layer; ++i) {
    bound += 4.0 * C * C;  // attention: w_qkv [3C, C] and w_out [C, C]
    if (!m.is_moe_layer(i))
      bound += 3.0 * C * double(m.d_ff);  // dense SwiGLU
    else if (moe.expert_form == ExpertForm::kAdapter)
      bound += 3.0 * C * double(moe.d_expert);  // the frozen FFN the adapters sit on
    else
      bound += 3.0 * C * double(moe.n_expert) * double(moe.d_expert);  // E experts of width F (split or not)
    if (bound > 1e18) break;                                           // already beyond any file
  }
  double held = 0;
  for (const auto& [name, t] : model) held += double(t.numel());
  if (bound > held)
    throw FileError(where, "config.toml describes a model of at least " +
                               std::to_string(int64_t(std::min(bound, 9e18))) +
                               " parameters, the model file holds " + std::to_string(int64_t(held)) +
                               " (mismatched or hostile checkpoint)");
}

LoadedModel load_model(const std::string& checkpoint_dir) {
  LoadedModel lm;
  lm.dir = resolve_checkpoint_dir(checkpoint_dir);
  auto ckpt = load_checkpoint(lm.dir);
  lm.cfg = load_run_config_text(ckpt.config_toml, lm.dir + "/config.toml");
  lm.tokenizer = Tokenizer::from_serialized(ckpt.tokenizer_model);
  check_config_fits_model_file(lm.cfg, lm.tokenizer->vocab_size(), ckpt.model, lm.dir);
  lm.model = build_model(lm.cfg, lm.tokenizer->vocab_size());
  load_module_state(*lm.model, ckpt.model, lm.dir + "/model.safetensors");
  lm.model->eval();
  lm.step = ckpt.step;
  return lm;
}

BatchLoss training_forward(TransformerLM& model, const Batcher::Batch& batch) {
  const int64_t B = batch.tokens.size(0), S = batch.tokens.size(1) - 1;
  RouteContext ctx;
  ctx.seq_domain = batch.domain;
  ctx.pool_len = batch.prompt_len;  // instruction rows of one sample: MoCE's prompt pool
  // No ctx.seq_cluster: MoCE assigns every sequence itself, by the rule evaluation and generation use too
  // (offline clustering only initialises its centroids; docs/routing.md, MoCE).
  auto out = model->forward(batch.tokens.narrow(1, 0, S), ctx);
  RECORD_USER_SCOPE("moeforge::cross_entropy");  // profiling scope (src/model/transformer.cpp)
  auto ce = torch::nn::functional::cross_entropy(
      out.logits.reshape({B * S, -1}), batch.tokens.narrow(1, 1, S).reshape(-1),
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));  // [B*S]
  torch::Tensor weight;
  if (batch.weight.defined()) weight = batch.weight.reshape(-1).to(ce.device(), ce.scalar_type());  // [B*S]
  return {ce, weight, std::move(out)};
}

torch::Tensor BatchLoss::loss() const {
  if (!weight.defined()) return token_ce.mean();
  // Every instruction sample has a response, so sum(w) >= 1 in practice; the clamp only keeps a batch of
  // nothing but padding at loss 0 instead of NaN.
  return (token_ce * weight).sum() / weight.sum().clamp_min(1.0);
}

TrainSummary train_model(RunConfig cfg, const TrainOptions& opt, std::ostream& log) {
  std::optional<Checkpoint> resume;
  std::string resume_dir;
  if (!opt.resume.empty()) {
    resume_dir = resolve_checkpoint_dir(opt.resume);
    resume = load_checkpoint(resume_dir);
    // A resumed run continues the checkpoint's own configuration exactly, but for the --set keys that
    // only say how long and how often (resumable_keys()).
    cfg = resume_config(*resume, resume_dir, opt.resume_overrides);
  }
  std::optional<Checkpoint> init;
  if (!opt.init_from.empty()) {
    if (resume) throw ConfigError("--init", "cannot be combined with --resume");
    init = load_checkpoint(opt.init_from);
  }
  cfg.validate();
  const auto& tc = cfg.train;
  // Data parallelism (docs/distributed.md): train.batch_size is the global batch, each of the W ranks
  // takes a contiguous slice of it; rank 0 alone writes the run folder.
  const int W = dist::world(), rank = dist::rank();
  const bool writer = rank == 0;
  if (tc.batch_size % W != 0)
    throw ConfigError("train.batch_size", std::to_string(tc.batch_size) + " sequences (the global batch) " +
                                              "do not split evenly over the " + std::to_string(W) + " ranks");
  const int threads = init_threads(int(tc.threads));
  torch::manual_seed(uint64_t(tc.seed));
  // The resolved configuration must be the same everywhere before anything is built from it.
  dist::check_same("the resolved configuration (--config, --set, --resume)",
                   cfg.to_toml() + "\nresume=" + (resume ? std::to_string(resume->step) : "-") +
                       "\ninit=" + opt.init_from);
  // The gradient buckets' sizes follow from it: a rank with other buckets would all-reduce other sizes.
  dist::check_same("the gradient bucket size (MOEFORGE_DIST_BUCKET_KB)",
                   std::to_string(dist::env().bucket_bytes));

  const std::string* tokenizer_model = resume ? &resume->tokenizer_model
                                       : init ? &init->tokenizer_model
                                              : nullptr;
  // Rank 0 trains (or loads) the tokenizer and fills the data cache first; the others then read the cache
  // rather than all writing it at once.
  std::optional<DataBundle> data_slot;
  if (writer) data_slot = prepare_data(cfg.data, tokenizer_model, log);
  dist::barrier("data preparation on rank 0");
  if (!writer) data_slot = prepare_data(cfg.data, tokenizer_model, log);
  DataBundle data = std::move(*data_slot);
  dist::check_same("the tokenizer and training data",
                   data.tokenizer->serialized() + "\n" + std::to_string(data.train.size()) + "\n" +
                       std::to_string(data.train.tokens.defined() ? data.train.tokens.numel() : 0));
  if (resume) check_config_fits_model_file(cfg, data.tokenizer->vocab_size(), resume->model, resume_dir);
  // Expert parallelism: each group of dist.expert_parallel = G consecutive ranks shares the experts (the
  // MoE layers build only their shard), the rest is data parallel, and so are the shards across the W/G
  // groups. In one process the key is ignored: every expert is local (eval, generate, resume).
  if (cfg.moe.expert_parallel > 1 && W > 1 && W % cfg.moe.expert_parallel != 0)
    throw ConfigError("dist.expert_parallel", std::to_string(cfg.moe.expert_parallel) +
                                                  " ranks per expert group do not divide the " +
                                                  std::to_string(W) + " ranks");
  dist::init_expert_groups(W > 1 ? int(cfg.moe.expert_parallel) : 1);
  TransformerLM model = build_model(cfg, data.tokenizer->vocab_size());
  model->train();
  const ExpertSharding sharding = expert_sharding(model, cfg.moe.routed_experts());
  std::vector<std::pair<std::string, torch::Tensor>> named;
  std::vector<torch::Tensor> params;
  std::vector<torch::Tensor> replicated, sharded;  // data parallel / this rank's experts
  for (auto& p : model->named_parameters()) {
    if (!p.value().requires_grad()) continue;  // frozen parts (upcycled dense FFN) are not optimised
    named.push_back({p.key(), p.value()});
    params.push_back(p.value());
    (sharding.names.count(p.key()) ? sharded : replicated).push_back(p.value());
  }
  // Data parallelism's gradient all-reduce, overlapped with the step's last backward
  // (docs/distributed.md, "Gradients").
  dist::GradientReducer reducer(replicated, dist::env().bucket_bytes);
  // Expert parallelism with several expert groups: the shards' gradients averaged over the replica group.
  dist::GradientReducer shard_reducer(sharded, dist::env().bucket_bytes, dist::Group::kReplicas);
  int64_t buckets_overlapped = 0;
  AdamW optim(named, tc);

  int64_t step = 0;
  if (init) {
    load_module_state(*model, shard_state(init->model, sharding, opt.init_from),
                      opt.init_from + "/model.safetensors");
    log << "initialised from " << opt.init_from << "\n";
  }
  if (resume) {
    load_module_state(*model, shard_state(resume->model, sharding, resume_dir),
                      resume_dir + "/model.safetensors");
    optim.load_state(shard_state(resume->optimizer, sharding, resume_dir),
                     resume_dir + "/optimizer.safetensors");
    step = resume->step;
    for (auto& t : resume->trainer)
      if (t.first == "rng.cpu") set_rng_state(t.second);
    log << "resumed from " << resume_dir << " at step " << step << "\n";
  }

  // MoCE offline clustering (docs/routing.md section 6): before the first step, on the weights training
  // starts from; a resumed run keeps the ids it started with (the centroids are router buffers, already
  // restored).
  if (cfg.moe.moce_clustering != SeqClustering::kOnline) {
    if (resume) {
      for (auto& t : resume->trainer)
        if (t.first == "cluster.train") data.train.cluster = t.second.to(torch::kLong);
      if (!data.train.cluster.defined() || data.train.cluster.numel() != data.train.size())
        throw FileError(resume_dir + "/trainer.safetensors",
                        "no cluster.train ids for the " + std::to_string(data.train.size()) +
                            " training sequences (moe.moce_clustering = \"" +
                            to_string(cfg.moe.moce_clustering) + "\")");
    } else {
      if (cfg.moe.moce_clustering == SeqClustering::kHidden && !init)
        throw ConfigError(
            "moe.moce_clustering",
            "\"hidden\" clusters the hidden states of a trained checkpoint: pass --init CHECKPOINT");
      const auto t0 = std::chrono::steady_clock::now();
      auto clusters = cluster_sequences(model, data.train, cfg.moe.moce_clustering, cfg.moe.n_cluster,
                                        data.tokenizer->vocab_size(), uint64_t(tc.seed), tc.batch_size);
      set_router_centroids(model, clusters);
      data.train.cluster = clusters.assignment;
      model->train();
      log << "clusters (" << to_string(cfg.moe.moce_clustering) << ", spherical k-means): sizes";
      for (int64_t g = 0; g < clusters.sizes.numel(); ++g) log << " " << clusters.sizes[g].item<int64_t>();
      log << "; mean cosine " << fmt(clusters.mean_similarity, 3) << ", domain purity "
          << fmt(table_purity(clusters.cluster_domain), 3) << " ("
          << fmt(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1) << " s)\n";
    }
  }
  // Identical initialisation: every rank starts from rank 0's parameters and router state (the same seed
  // makes them equal already; the broadcast makes it so whatever the ranks' libraries did).
  dist::broadcast_module(*model, 0, &sharding.names);  // an expert shard is its rank's own
  // Built once the training sequences have their clusters (the batches carry them). Every rank draws the
  // same global batches (same seed, same order) and trains on its slice of each (rank_slice).
  Batcher batcher(data.train, tc.batch_size, uint64_t(tc.seed), /*shuffle=*/true);
  if (resume)
    batcher.restore(trainer_counter(*resume, resume_dir, "batcher_epoch"),
                    trainer_counter(*resume, resume_dir, "batcher_position"));

  if (writer) fs::create_directories(opt.out_dir);
  const fs::path ckpt_root = fs::path(opt.out_dir) / "checkpoints";
  const std::string metrics_path = (fs::path(opt.out_dir) / "metrics.jsonl").string();
  TrainSummary summary;
  if (resume && writer) truncate_metrics(metrics_path, step);
  // Ranks other than 0 write their metrics nowhere (a stream without a file).
  std::ofstream metrics;
  if (writer) {
    metrics.open(metrics_path, resume ? std::ios::app : std::ios::trunc);
    if (!metrics) throw FileError(metrics_path, "cannot open for writing");
  }
  auto check_metrics = [&] {
    if (writer && !metrics.flush())
      throw FileError(metrics_path,
                      "write failed (disk full or file size limit?); the last checkpoint is " +
                          (summary.checkpoint.empty() ? std::string("none") : summary.checkpoint));
  };
  auto counts = count_model(*model);
  log << "model: " << counts.total_params << " parameters, " << counts.active_params << " active per token, "
      << fmt(counts.flops_per_token / 1e6, 2) << " MFLOP/token; router " << cfg.moe.router << ", "
      << cfg.moe.routed_experts() << " experts, top-" << cfg.moe.routed_used() << "; " << threads
      << " threads";
  if (W > 1)
    log << "; rank " << rank << " of " << W << " (" << dist::env().launcher << "), " << tc.batch_size / W
        << " of the " << tc.batch_size << " sequences of each global batch";
  if (sharding.on())
    log << ", experts [" << sharding.shard.first << ", " << sharding.shard.first + sharding.shard.count
        << ") of " << sharding.n_expert << " on this rank (dist.expert_parallel)";
  log << "\n";

  auto save = [&](int64_t at_step) {
    const fs::path dir = ckpt_root / step_name(at_step);
    // Expert parallelism: every rank's shards to every rank (a collective, before rank 0 writes), so the
    // checkpoint holds all experts whatever the world size that reads it.
    NamedTensors model_state = gather_state(module_state(*model), sharding);
    NamedTensors optim_state = gather_state(optim.state(), sharding);
    if (W > 1) {
      // The ranks must hold the same state, bit for bit (the same averaged gradients, the same global
      // router feedback); a checkpoint of rank 0's state is then the group's. Checked at every checkpoint.
      const uint64_t digest = dist::module_digest(*model, &sharding.names);
      dist::check_same("the model's parameters and router state at step " + std::to_string(at_step),
                       std::to_string(digest));
      std::ostringstream hex;
      hex << std::hex << std::setw(16) << std::setfill('0') << digest;
      log << "\ndist: rank " << rank << " state digest at step " << at_step << ": " << hex.str()
          << " (the same on every rank)\n";
    }
    // One checkpoint per step for the whole group: rank 0 writes it (every rank holds the same state), the
    // others wait until it is complete, so that none goes past a step whose checkpoint might not exist.
    if (!writer) {
      dist::barrier("checkpoint of step " + std::to_string(at_step) + " by rank 0");
      return dir.string();
    }
    Checkpoint c;
    c.step = at_step;
    c.config_toml = cfg.to_toml();
    c.tokenizer_model = data.tokenizer->serialized();
    c.model = std::move(model_state);
    c.optimizer = std::move(optim_state);
    c.trainer = {{"rng.cpu", rng_state()}};
    if (data.train.cluster.defined()) c.trainer.push_back({"cluster.train", data.train.cluster});
    c.trainer_meta = {{"batcher_epoch", std::to_string(batcher.epoch())},
                      {"batcher_position", std::to_string(batcher.position())},
                      {"step", std::to_string(at_step)}};
    save_checkpoint(dir.string(), c);
    write_file_atomic((ckpt_root / "latest").string(), step_name(at_step) + "\n");
    prune_checkpoints(ckpt_root, tc.keep_checkpoints);
    dist::barrier("checkpoint of step " + std::to_string(at_step) + " by rank 0");
    return dir.string();
  };

  auto run_eval = [&](int64_t at_step, TrainSummary& summary) {
    summary.validation = evaluate(model, data.validation, tc.batch_size, tc.eval_batches, "validation");
    // Every rank evaluates the whole split with the same weights (so the measures are the global ones);
    // rank 0 writes them.
    auto j = summary.validation->to_json();
    j["step"] = at_step;
    if (writer) metrics << j.dump() << "\n";
    std::string line = "eval @" + std::to_string(at_step) + ": validation loss " +
                       fmt(summary.validation->loss) + " (ppl " + fmt(summary.validation->perplexity, 2) +
                       ")";
    if (data.heldout.tokens.defined() && data.heldout.size() > 0) {
      summary.heldout = evaluate(model, data.heldout, tc.batch_size, tc.eval_batches, "heldout");
      auto h = summary.heldout->to_json();
      h["step"] = at_step;
      if (writer) metrics << h.dump() << "\n";
      line += ", held-out loss " + fmt(summary.heldout->loss) + " (ppl " +
              fmt(summary.heldout->perplexity, 2) + ")";
    }
    line += ", MaxVio_global " + fmt(summary.validation->max_vio_global, 3) + ", specialisation " +
            fmt(summary.validation->specialization, 3);
    if (summary.validation->has_ec)
      line += "; expert choice: batch-routed loss " + fmt(summary.validation->ec_batch_loss) +
              ", threshold-routed " + fmt(summary.validation->ec_threshold_loss) + " (gap " +
              fmt(summary.validation->ec_gap()) + ")";
    if (!summary.validation->cluster_domain.empty())
      line += "; cluster purity " + fmt(summary.validation->cluster_purity, 3);
    check_metrics();
    return line;
  };

  const int64_t last = opt.stop_after > 0 ? std::min(opt.stop_after, tc.steps) : tc.steps;
  const int64_t S = cfg.data.seq_len;
  ProgressBar bar(opt.progress_label, tc.steps, log, opt.progress && writer);
  const auto t_start = std::chrono::steady_clock::now();
  int64_t tokens_done = 0;
  double grad_sync_seconds = 0;  // waiting on the gradient all-reduce (data parallelism)
  const auto comm_start = dist::comm_stats();
  std::vector<std::string> eval_lines;
  while (step < last) {
    if (opt.before_step) opt.before_step(step, model);
    const double lr = learning_rate(tc, step);
    double loss_sum = 0, aux_sum = 0;
    std::vector<RoutingPlan> plans;
    for (int64_t micro = 0; micro < tc.grad_accum; ++micro) {
      auto global_batch = batcher.next();
      if (summary.first_batch_tokens == 0) {
        summary.first_batch_tokens = global_batch.tokens.numel();
        summary.first_batch_digest = token_digest(global_batch.tokens);
      }
      auto batch = rank_slice(global_batch, rank, W);
      const int64_t B = global_batch.tokens.size(0);  // tokens_done counts the global batch
      dist::GlobalBatchScope global_stats;            // the balance loss's shares over the global batch
      auto fwd = training_forward(model, batch);
      auto& ce = fwd.token_ce;  // [B*S]
      auto& out = fwd.out;
      const auto ce_loss = fwd.loss();  // response tokens only for instruction data
      auto loss = ce_loss + out.aux_loss;
      auto scaled = loss / double(tc.grad_accum);
      if (micro == tc.grad_accum - 1 && dist::env().overlap) {
        reducer.arm(scaled);
        shard_reducer.arm(scaled);
      }
      scaled.backward();
      loss_sum += ce_loss.item<double>() / double(tc.grad_accum);
      aux_sum += out.aux_loss.item<double>() / double(tc.grad_accum);
      // Each micro-batch's token losses join its plans in the routers' feedback (docs/routing.md, "State
      // updates"): after_step then sees every micro-batch of the step, not only the last.
      model->add_token_loss(ce.detach());
      plans = std::move(out.plans);
      tokens_done += B * S;
    }
    // Data parallelism: the gradients, the logged losses and the stop request become the group's (mean over
    // ranks: every rank's slice has the same number of tokens, so the mean of the ranks' mean losses is the
    // global batch's); the clipping norm is then the global one, and every rank takes the same decisions.
    const auto t_sync = std::chrono::steady_clock::now();
    reducer.finish();
    buckets_overlapped += reducer.started_in_backward();
    // An expert shard's gradient already sums the tokens of its expert group's G ranks (the reverse
    // all-to-all brought them); averaged over the W/G replica groups it is the sum over all ranks / (W/G),
    // and the global batch's mean loss is the mean of the W ranks' mean losses: divide by G.
    shard_reducer.finish();
    const double per_group = 1.0 / double(dist::group_size(dist::Group::kExperts));
    for (auto& p : sharded)
      if (p.grad().defined()) p.mutable_grad().mul_(per_group);
    grad_sync_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t_sync).count();
    int group_signal = opt.stop_on_signal ? stop_signal() : 0;  // a signal to any rank stops them all
    if (W > 1) {
      std::vector<torch::Tensor> t{torch::tensor({loss_sum, aux_sum,
                                                  group_signal == SIGTERM ? 1000.0
                                                  : group_signal != 0     ? 1.0
                                                                          : 0.0},
                                                 torch::kDouble)};
      dist::allreduce_sum(t, "the step's losses");
      loss_sum = t[0][0].item<double>() / double(W);
      aux_sum = t[0][1].item<double>() / double(W);
      // Summed over ranks: 1000 per SIGTERM, 1 per SIGINT; every rank then reports the same signal.
      const double sig = t[0][2].item<double>();
      group_signal = sig >= 1000 ? SIGTERM : sig >= 1 ? SIGINT : 0;
    }
    const double grad_norm = sharding.on() ? dist::clip_grad_norm_sharded(replicated, sharded, tc.grad_clip)
                                           : clip_grad_norm(params, tc.grad_clip);
    if (!std::isfinite(loss_sum) || !std::isfinite(aux_sum) || !std::isfinite(grad_norm)) {
      std::ostringstream why;
      why << "non-finite training "
          << (!std::isfinite(loss_sum)  ? "loss"
              : !std::isfinite(aux_sum) ? "aux loss"
                                        : "gradient")
          << " at step " << step << " (loss " << loss_sum << ", aux " << aux_sum << ", grad norm "
          << grad_norm << ")";
      if (tc.nan_policy == "stop")
        throw std::runtime_error(
            why.str() + "; stopped without writing a checkpoint (train.nan_policy = \"stop\")" +
            (summary.checkpoint.empty() ? "" : "; last good checkpoint: " + summary.checkpoint));
      log << "\n" << why.str() << ": step skipped (train.nan_policy = \"skip\")\n";
      // The weights do not move, but the routers still learn from the batch: a non-finite expert output
      // is exactly the health signal reliability tracking must see (docs/routing.md, hierarchical).
      model->after_step();
      optim.zero_grad();
      ++summary.skipped_steps;
      ++step;
      continue;
    }
    optim.step(lr);
    model->after_step();
    optim.zero_grad();
    ++step;
    summary.step_losses.push_back(loss_sum);
    // The routing measures of the global batch (the last micro-batch's plans, as before).
    for (auto& p : plans) p.stats = dist::global_stats(p.stats);
    double step_max_vio = 0;
    for (auto& p : plans) step_max_vio += p.stats.max_vio / double(plans.size());
    summary.step_max_vio.push_back(step_max_vio);

    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    const double tok_s = double(tokens_done) / std::max(elapsed, 1e-9);
    if (step % tc.log_every == 0 || step == last) {
      nlohmann::json j = {{"step", step},         {"split", "train"}, {"loss", loss_sum},
                          {"aux_loss", aux_sum},  {"lr", lr},         {"grad_norm", grad_norm},
                          {"tokens_per_s", tok_s}};
      nlohmann::json max_vio = nlohmann::json::array(), loads = nlohmann::json::array();
      double mv = 0, dropped = 0;
      for (auto& p : plans) {
        max_vio.push_back(p.stats.max_vio);
        loads.push_back(p.stats.load);
        mv += p.stats.max_vio / double(plans.size());
        dropped += p.stats.dropped_share / double(plans.size());
      }
      j["max_vio_batch"] = mv;
      j["dropped_share"] = dropped;  // (requested - kept) / requested, mean over MoE layers
      if (!plans.empty()) j["plan_tokens"] = plans.front().stats.n_tokens;  // the tokens `load` counts
      j["max_vio_batch_layers"] = max_vio;
      j["load"] = loads;
      if (writer) metrics << j.dump() << "\n";
      check_metrics();
    }
    bar.update(step, "loss " + fmt(loss_sum, 3) + " | " + fmt(tok_s / 1000.0, 1) + "k tok/s" +
                         (opt.progress_extra ? " | " + opt.progress_extra(step) : std::string()));
    if (tc.eval_every > 0 && step % tc.eval_every == 0 && step != last)
      eval_lines.push_back(run_eval(step, summary));
    // train.checkpoint_every: N steps, or (-1, the default) at every evaluation, so that an interrupted
    // run loses at most one evaluation interval (docs/reliability.md).
    const int64_t ckpt_every = tc.checkpoint_every < 0 ? tc.eval_every : tc.checkpoint_every;
    if (ckpt_every > 0 && step % ckpt_every == 0 && step != last) summary.checkpoint = save(step);
    // SIGINT / SIGTERM (moeforge train): the step is done; checkpoint it and stop.
    if (opt.stop_on_signal && group_signal != 0 && step != last) {
      summary.interrupted_by = group_signal;
      if (summary.checkpoint.empty() || fs::path(summary.checkpoint).filename() != step_name(step))
        summary.checkpoint = save(step);
      break;
    }
  }
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  summary.tokens_per_s = double(tokens_done) / std::max(summary.seconds, 1e-9);
  bar.finish(summary.step_losses.empty() ? "" : "loss " + fmt(summary.step_losses.back(), 3));
  for (auto& l : eval_lines) log << l << "\n";
  if (W > 1) {
    // What data parallelism cost this rank (docs/distributed.md, "Measured"): payload of its collectives
    // and the time it waited on them, the gradient all-reduce apart; rank 0 also writes it to dist.json
    // (moeforge bench --dist reads it).
    const auto c = dist::comm_stats();
    const double steps_run = std::max<double>(1, double(summary.step_losses.size() + summary.skipped_steps));
    const double secs = std::max(summary.seconds, 1e-9);
    nlohmann::json d = {{"rank", rank},
                        {"world", W},
                        {"expert_parallel", cfg.moe.expert_parallel},
                        {"steps", steps_run},
                        {"step_ms", 1e3 * summary.seconds / steps_run},
                        {"tokens_per_s", summary.tokens_per_s},
                        {"bytes_per_step", double(c.bytes - comm_start.bytes) / steps_run},
                        {"collectives_per_step", double(c.calls - comm_start.calls) / steps_run},
                        {"comm_ms_per_step", 1e3 * (c.seconds - comm_start.seconds) / steps_run},
                        {"comm_share", (c.seconds - comm_start.seconds) / secs},
                        {"grad_sync_ms_per_step", 1e3 * grad_sync_seconds / steps_run},
                        {"grad_buckets", reducer.n_buckets()},
                        {"grad_buckets_overlapped_per_step", double(buckets_overlapped) / steps_run},
                        {"grad_overlap", dist::env().overlap},
                        {"grad_bucket_bytes", dist::env().bucket_bytes},
                        {"a2a_bytes_per_step", double(c.a2a_bytes - comm_start.a2a_bytes) / steps_run},
                        {"a2a_calls_per_step", double(c.a2a_calls - comm_start.a2a_calls) / steps_run},
                        {"a2a_ms_per_step", 1e3 * (c.a2a_seconds - comm_start.a2a_seconds) / steps_run},
                        {"a2a_share", (c.a2a_seconds - comm_start.a2a_seconds) / secs}};
    log << "dist: rank " << rank << ": " << fmt(d["bytes_per_step"].get<double>() / 1e6, 3)
        << " MB sent per step in " << fmt(d["collectives_per_step"].get<double>(), 1)
        << " collectives; gradient all-reduce " << fmt(d["grad_sync_ms_per_step"].get<double>(), 2)
        << " ms per step after backward (" << reducer.n_buckets() << " buckets, "
        << fmt(d["grad_buckets_overlapped_per_step"].get<double>(), 1)
        << " per step started during backward), all collectives "
        << fmt(d["comm_ms_per_step"].get<double>(), 2) << " ms per step ("
        << fmt(100.0 * d["comm_share"].get<double>(), 1) << "% of the training time)";
    if (c.a2a_calls > comm_start.a2a_calls)
      log << "; of which expert-parallel all-to-all " << fmt(d["a2a_bytes_per_step"].get<double>() / 1e6, 3)
          << " MB in " << fmt(d["a2a_calls_per_step"].get<double>(), 1) << " calls, "
          << fmt(d["a2a_ms_per_step"].get<double>(), 2) << " ms per step ("
          << fmt(100.0 * d["a2a_share"].get<double>(), 1) << "% of the training time)";
    log << "\n";
    if (writer) write_file_atomic((fs::path(opt.out_dir) / "dist.json").string(), d.dump(2) + "\n");
  }
  summary.step = step;
  if (summary.interrupted_by) return summary;
  if (step == tc.steps || tc.eval_every > 0) log << run_eval(step, summary) << "\n";
  summary.checkpoint = save(step);
  log << "checkpoint: " << summary.checkpoint << "\n";
  return summary;
}

}  // namespace moeforge
