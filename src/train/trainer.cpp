// Training a language model end to end (trainer.h). train_model is the Trainer below, one member function
// per phase: set-up and resume, data, model and optimiser, distributed set-up, the step, evaluation, the
// checkpoint, and the end of the run (docs/architecture.md, "One training step").
#include "moeforge/train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>

#include "moeforge/data/prepare.h"
#include "moeforge/dist/dist.h"
#include "moeforge/dist/sync.h"
#include "moeforge/model/load.h"
#include "moeforge/routing/stats.h"
#include "moeforge/train/checkpoint_policy.h"
#include "moeforge/train/optim.h"
#include "moeforge/train/parallel.h"
#include "moeforge/train/run_folder.h"
#include "moeforge/train/sequence_clustering.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"
#include "moeforge/util/interrupt.h"
#include "moeforge/util/progress.h"
#include "moeforge/util/runtime.h"

namespace fs = std::filesystem;

namespace moeforge {

namespace {

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

std::string fmt(double v, int precision = 4) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(precision) << v;
  return os.str();
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// What one optimiser step gave: its losses and gradient norm (the group's, in data parallelism), the last
// micro-batch's routing plans, and a stop signal any rank received.
struct StepResult {
  double loss = 0, aux = 0, grad_norm = 0, lr = 0;
  std::vector<RoutingPlan> plans;
  int signal = 0;
  bool finite() const { return std::isfinite(loss) && std::isfinite(aux) && std::isfinite(grad_norm); }
};

class Trainer {
 public:
  Trainer(RunConfig cfg, const TrainOptions& opt, std::ostream& log)
      : cfg_(std::move(cfg)), opt_(opt), log_(log) {}

  TrainSummary run() {
    set_up();
    load_data();
    build_model_and_optimiser();
    restore();
    cluster_sequences_offline();
    start_distributed();
    open_run_folder();
    train_loop();
    return finish();
  }

 private:
  // --- set-up and resume ---
  void set_up();
  void claim_run_folder();
  void load_data();
  void build_model_and_optimiser();
  void restore();
  void cluster_sequences_offline();
  // --- distributed set-up ---
  void start_distributed();
  void open_run_folder();
  // --- the steps ---
  void train_loop();
  StepResult step();
  void sync_gradients(StepResult& r);
  void log_step(const StepResult& r, double tok_s);
  bool skip_non_finite(const StepResult& r);
  // --- evaluation, checkpoints, the end ---
  std::string evaluate_now(int64_t at_step);
  std::string checkpoint(int64_t at_step);
  void report_communication();
  TrainSummary finish();
  void check_metrics();

  RunConfig cfg_;
  const TrainOptions& opt_;
  std::ostream& log_;
  int world_ = 1, rank_ = 0, threads_ = 0;
  MatmulPrecision precision_ = MatmulPrecision::kFloat32;  // train.precision (run_precision)
  std::string precision_line_;
  bool writer_ = true;  // rank 0 writes the run folder
  std::optional<Checkpoint> resume_, init_;
  std::optional<RunFolderLock> lock_;  // rank 0 owns the run folder while it trains
  std::string resume_dir_;
  std::optional<DataBundle> data_;
  TransformerLM model_{nullptr};
  ExpertSharding sharding_;
  std::vector<std::pair<std::string, torch::Tensor>> named_;
  std::vector<torch::Tensor> params_, replicated_, sharded_;  // all / data parallel / this rank's experts
  std::optional<dist::GradientReducer> reducer_, shard_reducer_;
  std::optional<AdamW> optim_;
  std::optional<Batcher> batcher_;
  int64_t step_ = 0, last_ = 0, buckets_overlapped_ = 0, tokens_done_ = 0;
  double grad_sync_seconds_ = 0;  // waiting on the gradient all-reduce (data parallelism)
  dist::CommStats comm_start_;
  fs::path ckpt_root_;
  std::string metrics_path_;
  std::ofstream metrics_;  // ranks other than 0 write their metrics nowhere (a stream without a file)
  TrainSummary summary_;
  std::vector<std::string> eval_lines_;
};

// The checkpoint to resume or start from, the threads and the seed, and the checks every rank must pass
// before anything is built: the configuration and the gradient bucket size the same everywhere.
void Trainer::set_up() {
  if (!opt_.resume.empty()) {
    resume_dir_ = resolve_checkpoint_dir(opt_.resume);
    resume_ = load_checkpoint(resume_dir_);
    // A resumed run continues the checkpoint's own configuration exactly, but for the --set keys that
    // only say how long and how often (checkpoint_policy.h).
    cfg_ = resume_config(*resume_, resume_dir_, opt_.resume_overrides);
  }
  if (!opt_.init_from.empty()) {
    if (resume_) throw ConfigError("--init", "cannot be combined with --resume");
    init_ = load_checkpoint(opt_.init_from);
  }
  world_ = dist::world();
  rank_ = dist::rank();
  writer_ = rank_ == 0;
  if (writer_) claim_run_folder();
  const auto& tc = cfg_.train;
  // Data parallelism (docs/distributed.md): train.batch_size is the global batch, each of the W ranks
  // takes a contiguous slice of it; rank 0 alone writes the run folder.
  if (tc.batch_size % world_ != 0)
    throw ConfigError("train.batch_size", std::to_string(tc.batch_size) + " sequences (the global batch) " +
                                              "do not split evenly over the " + std::to_string(world_) +
                                              " ranks");
  threads_ = init_threads(int(tc.threads));
  precision_ = run_precision(tc, read_cpu_features(), &precision_line_);
  torch::manual_seed(uint64_t(tc.seed));
  // The resolved configuration must be the same everywhere before anything is built from it.
  dist::check_same("the resolved configuration (--config, --set, --resume)",
                   cfg_.to_toml() + "\nresume=" + (resume_ ? std::to_string(resume_->step) : "-") +
                       "\ninit=" + opt_.init_from);
  // The gradient buckets' sizes follow from it: a rank with other buckets would all-reduce other sizes.
  dist::check_same("the gradient bucket size (MOEFORGE_DIST_BUCKET_KB)",
                   std::to_string(dist::env().bucket_bytes));
}

// Rank 0 owns the run folder from before anything is written to the end (docs/reliability.md, "Shared
// folders and limits"): the lock; a fresh run, or a resume into another run's folder, must not find an
// earlier run there unless told to overwrite it; half-written checkpoints of dead processes go; and the
// checkpoint folder must be writable now, not at the first checkpoint after the training.
void Trainer::claim_run_folder() {
  lock_.emplace(opt_.out_dir);
  const fs::path out = fs::weakly_canonical(opt_.out_dir);
  const bool own_run =
      resume_ && fs::weakly_canonical(resume_dir_).string().rfind(out.string() + "/", 0) == 0;
  if (!own_run) claim_for_fresh_run(opt_.out_dir, opt_.overwrite, log_);
  const std::string ckpts = (fs::path(opt_.out_dir) / "checkpoints").string();
  remove_stale_temporaries(ckpts, log_);
  check_writable(ckpts);
}

// Rank 0 trains (or loads) the tokenizer and fills the data cache first; the others then read the cache
// rather than all writing it at once.
void Trainer::load_data() {
  const std::string* tokenizer_model = resume_ ? &resume_->tokenizer_model
                                       : init_ ? &init_->tokenizer_model
                                               : nullptr;
  if (writer_) data_ = prepare_data(cfg_.data, tokenizer_model, log_);
  dist::barrier("data preparation on rank 0");
  if (!writer_) data_ = prepare_data(cfg_.data, tokenizer_model, log_);
  dist::check_same("the tokenizer and training data",
                   data_->tokenizer->serialized() + "\n" + std::to_string(data_->train.size()) + "\n" +
                       std::to_string(data_->train.size() * (data_->train.seq_len() + 1)));
  // The model a checkpoint's config describes must fit the checkpoint's model file before it is built
  // (docs/reliability.md, "Checkpoints"): a resumed one, and the one --init starts from.
  if (resume_)
    check_config_fits_model_file(cfg_, data_->tokenizer->vocab_size(), resume_->model, resume_dir_);
  if (init_) check_config_fits_model_file(cfg_, data_->tokenizer->vocab_size(), init_->model, opt_.init_from);
}

// The model (only this rank's experts under expert parallelism), the parameters the optimiser moves, the
// gradient reducers of data parallelism and AdamW.
void Trainer::build_model_and_optimiser() {
  // Expert parallelism: each group of dist.expert_parallel = G consecutive ranks shares the experts (the
  // MoE layers build only their shard), the rest is data parallel, and so are the shards across the W/G
  // groups. In one process the key is ignored: every expert is local (eval, generate, resume).
  const int64_t ep = cfg_.dist.expert_parallel;
  if (ep > 1 && world_ > 1 && world_ % ep != 0)
    throw ConfigError("dist.expert_parallel", std::to_string(ep) +
                                                  " ranks per expert group do not divide the " +
                                                  std::to_string(world_) + " ranks");
  dist::init_expert_groups(world_ > 1 ? int(ep) : 1);
  model_ = build_model(cfg_, data_->tokenizer->vocab_size());
  model_->train();
  sharding_ = expert_sharding(model_, cfg_.moe.routed_experts());
  for (auto& p : model_->named_parameters()) {
    if (!p.value().requires_grad()) continue;  // frozen parts (upcycled dense FFN) are not optimised
    named_.push_back({p.key(), p.value()});
    params_.push_back(p.value());
    (sharding_.names.count(p.key()) ? sharded_ : replicated_).push_back(p.value());
  }
  // Data parallelism's gradient all-reduce, overlapped with the step's last backward
  // (docs/distributed.md, "Gradients").
  reducer_.emplace(replicated_, dist::env().bucket_bytes);
  // Expert parallelism with several expert groups: the shards' gradients averaged over the replica group.
  shard_reducer_.emplace(sharded_, dist::env().bucket_bytes, dist::Group::kReplicas);
  optim_.emplace(named_, cfg_.train);
}

// Weights from --init, or weights, optimiser state, step and RNG from the checkpoint a run resumes.
void Trainer::restore() {
  if (init_) {
    load_module_state(*model_, shard_state(init_->model, sharding_, opt_.init_from),
                      opt_.init_from + "/model.safetensors");
    log_ << "initialised from " << opt_.init_from << "\n";
  }
  if (resume_) {
    load_module_state(*model_, shard_state(resume_->model, sharding_, resume_dir_),
                      resume_dir_ + "/model.safetensors");
    optim_->load_state(shard_state(resume_->optimizer, sharding_, resume_dir_),
                       resume_dir_ + "/optimizer.safetensors");
    step_ = resume_->step;
    for (auto& t : resume_->trainer)
      if (t.first == "rng.cpu") set_rng_state(t.second);
    log_ << "resumed from " << resume_dir_ << " at step " << step_ << "\n";
  }
}

// Offline sequence clustering (docs/routing.md section 6), when the first MoE layer's router asks for it:
// before the first step, on the weights training starts from. A resumed run keeps the centroids it
// restored with the router's buffers.
void Trainer::cluster_sequences_offline() {
  auto layers = model_->moe_layers();
  if (layers.empty() || resume_) return;
  const auto how = layers.front()->router->offline_clustering();
  if (!how) return;
  if (how->method == "hidden" && !init_)
    throw ConfigError(
        how->key, "\"hidden\" clusters the hidden states of a trained checkpoint: pass --init CHECKPOINT");
  const auto t0 = std::chrono::steady_clock::now();
  const auto& tc = cfg_.train;
  auto clusters = cluster_sequences(model_, data_->train, *how, data_->tokenizer->vocab_size(),
                                    uint64_t(tc.seed), tc.batch_size);
  set_router_centroids(model_, clusters, how->key);
  model_->train();
  log_ << "clusters (" << how->method << ", spherical k-means): sizes";
  for (int64_t g = 0; g < clusters.sizes.numel(); ++g) log_ << " " << clusters.sizes[g].item<int64_t>();
  log_ << "; mean cosine " << fmt(clusters.mean_similarity, 3) << ", domain purity "
       << fmt(table_purity(clusters.cluster_domain), 3) << " (" << fmt(seconds_since(t0), 1) << " s)\n";
}

// Identical initialisation and data order on every rank: every rank starts from rank 0's parameters and
// router state (the same seed makes them equal already; the broadcast makes it so whatever the ranks'
// libraries did), and draws the same global batches (same seed, same order), training on its slice.
void Trainer::start_distributed() {
  dist::broadcast_module(*model_, 0, &sharding_.names);  // an expert shard is its rank's own
  const auto& tc = cfg_.train;
  batcher_.emplace(data_->train, tc.batch_size, uint64_t(tc.seed), /*shuffle=*/true);
  if (resume_)
    batcher_->restore(trainer_counter(*resume_, resume_dir_, "batcher_epoch"),
                      trainer_counter(*resume_, resume_dir_, "batcher_position"));
}

// The run folder (rank 0): checkpoints/ and metrics.jsonl, cut back to the resumed step; then the model line.
void Trainer::open_run_folder() {
  if (writer_) fs::create_directories(opt_.out_dir);
  ckpt_root_ = fs::path(opt_.out_dir) / "checkpoints";
  metrics_path_ = (fs::path(opt_.out_dir) / "metrics.jsonl").string();
  if (resume_ && writer_) truncate_metrics(metrics_path_, step_);
  if (writer_) {
    metrics_.open(metrics_path_, resume_ ? std::ios::app : std::ios::trunc);
    if (!metrics_) throw FileError(metrics_path_, "cannot open for writing");
  }
  const auto& tc = cfg_.train;
  auto counts = count_model(*model_);
  log_ << "model: " << counts.total_params << " parameters, " << counts.active_params << " active per token, "
       << fmt(counts.flops_per_token / 1e6, 2) << " MFLOP/token; router " << cfg_.moe.router << ", "
       << cfg_.moe.routed_experts() << " experts, top-" << cfg_.moe.routed_used() << "; " << threads_
       << " threads";
  if (world_ > 1)
    log_ << "; rank " << rank_ << " of " << world_ << " (" << dist::env().launcher << "), "
         << tc.batch_size / world_ << " of the " << tc.batch_size << " sequences of each global batch";
  if (sharding_.on())
    log_ << ", experts [" << sharding_.shard.first << ", " << sharding_.shard.first + sharding_.shard.count
         << ") of " << sharding_.n_expert << " on this rank (dist.expert_parallel)";
  log_ << "\n" << precision_line_ << "\n";
}

void Trainer::check_metrics() {
  if (writer_ && !metrics_.flush())
    throw FileError(metrics_path_,
                    "write failed (disk full or file size limit?); the last checkpoint is " +
                        (summary_.checkpoint.empty() ? std::string("none") : summary_.checkpoint));
}

void Trainer::train_loop() {
  const auto& tc = cfg_.train;
  last_ = opt_.stop_after > 0 ? std::min(opt_.stop_after, tc.steps) : tc.steps;
  ProgressBar bar(opt_.progress_label, tc.steps, log_, opt_.progress && writer_);
  const auto t_start = std::chrono::steady_clock::now();
  comm_start_ = dist::comm_stats();
  while (step_ < last_) {
    if (opt_.before_step) opt_.before_step(step_, model_);
    StepResult r = step();
    if (skip_non_finite(r)) continue;
    optim_->step(r.lr);
    model_->after_step();
    optim_->zero_grad();
    ++step_;
    summary_.step_losses.push_back(r.loss);
    // The routing measures of the global batch (the last micro-batch's plans, as before).
    for (auto& p : r.plans) p.stats = global_routing_stats(p.stats);
    double step_max_vio = 0;
    for (auto& p : r.plans) step_max_vio += p.stats.max_vio / double(r.plans.size());
    summary_.step_max_vio.push_back(step_max_vio);
    const double tok_s = double(tokens_done_) / std::max(seconds_since(t_start), 1e-9);
    if (step_ % tc.log_every == 0 || step_ == last_) log_step(r, tok_s);
    bar.update(step_, "loss " + fmt(r.loss, 3) + " | " + fmt(tok_s / 1000.0, 1) + "k tok/s" +
                          (opt_.progress_extra ? " | " + opt_.progress_extra(step_) : std::string()));
    if (tc.eval_every > 0 && step_ % tc.eval_every == 0 && step_ != last_)
      eval_lines_.push_back(evaluate_now(step_));
    // train.checkpoint_every: N steps, or (-1, the default) at every evaluation, so that an interrupted
    // run loses at most one evaluation interval (docs/reliability.md).
    const int64_t ckpt_every = tc.checkpoint_every < 0 ? tc.eval_every : tc.checkpoint_every;
    if (ckpt_every > 0 && step_ % ckpt_every == 0 && step_ != last_) summary_.checkpoint = checkpoint(step_);
    // SIGINT / SIGTERM (moeforge train): the step is done; checkpoint it and stop.
    if (opt_.stop_on_signal && r.signal != 0 && step_ != last_) {
      summary_.interrupted_by = r.signal;
      if (summary_.checkpoint.empty() || fs::path(summary_.checkpoint).filename() != step_name(step_))
        summary_.checkpoint = checkpoint(step_);
      break;
    }
  }
  summary_.seconds = seconds_since(t_start);
  summary_.tokens_per_s = double(tokens_done_) / std::max(summary_.seconds, 1e-9);
  bar.finish_at(step_, summary_.step_losses.empty() ? "" : "loss " + fmt(summary_.step_losses.back(), 3));
  for (auto& l : eval_lines_) log_ << l << "\n";
}

// One step's forward and backward passes over train.grad_accum micro-batches, then the gradients, losses
// and stop request made the group's; the clipped gradient norm.
StepResult Trainer::step() {
  const auto& tc = cfg_.train;
  const int64_t S = cfg_.data.seq_len;
  StepResult r;
  r.lr = learning_rate(tc, step_);
  // The forward and backward passes' products in train.precision; evaluation runs in float32.
  MatmulPrecisionGuard precision(precision_);
  for (int64_t micro = 0; micro < tc.grad_accum; ++micro) {
    auto global_batch = batcher_->next();
    if (summary_.first_batch_tokens == 0) {
      summary_.first_batch_tokens = global_batch.tokens.numel();
      summary_.first_batch_digest = token_digest(global_batch.tokens);
    }
    auto batch = rank_slice(global_batch, rank_, world_);
    const int64_t B = global_batch.tokens.size(0);  // tokens_done counts the global batch
    dist::GlobalBatchScope global_stats;            // the balance loss's shares over the global batch
    auto fwd = training_forward(model_, batch);
    auto& out = fwd.out;
    const auto ce_loss = fwd.loss();  // response tokens only for instruction data
    auto scaled = (ce_loss + out.aux_loss) / double(tc.grad_accum);
    if (micro == tc.grad_accum - 1 && dist::env().overlap) {
      reducer_->arm(scaled);
      shard_reducer_->arm(scaled);
    }
    scaled.backward();
    r.loss += ce_loss.item<double>() / double(tc.grad_accum);
    r.aux += out.aux_loss.item<double>() / double(tc.grad_accum);
    // Each micro-batch's token losses join its plans in the routers' feedback (docs/routing.md, "State
    // updates"): after_step then sees every micro-batch of the step, not only the last.
    model_->add_token_loss(fwd.token_ce.detach());
    r.plans = std::move(out.plans);
    tokens_done_ += B * S;
  }
  sync_gradients(r);
  r.grad_norm = sharding_.on() ? dist::clip_grad_norm_sharded(replicated_, sharded_, tc.grad_clip)
                               : clip_grad_norm(params_, tc.grad_clip);
  return r;
}

// Data parallelism: the gradients, the logged losses and the stop request become the group's (mean over
// ranks: every rank's slice has the same number of tokens, so the mean of the ranks' mean losses is the
// global batch's); the clipping norm is then the global one, and every rank takes the same decisions.
void Trainer::sync_gradients(StepResult& r) {
  const auto t_sync = std::chrono::steady_clock::now();
  reducer_->finish();
  buckets_overlapped_ += reducer_->started_in_backward();
  // An expert shard's gradient already sums the tokens of its expert group's G ranks (the reverse
  // all-to-all brought them); averaged over the W/G replica groups it is the sum over all ranks / (W/G),
  // and the global batch's mean loss is the mean of the W ranks' mean losses: divide by G.
  shard_reducer_->finish();
  const double per_group = 1.0 / double(dist::group_size(dist::Group::kExperts));
  for (auto& p : sharded_)
    if (p.grad().defined()) p.mutable_grad().mul_(per_group);
  grad_sync_seconds_ += seconds_since(t_sync);
  r.signal = opt_.stop_on_signal ? stop_signal() : 0;  // a signal to any rank stops them all
  if (world_ > 1) {
    std::vector<torch::Tensor> t{torch::tensor({r.loss, r.aux,
                                                r.signal == SIGTERM ? 1000.0
                                                : r.signal != 0     ? 1.0
                                                                    : 0.0},
                                               torch::kDouble)};
    dist::allreduce_sum(t, "the step's losses");
    r.loss = t[0][0].item<double>() / double(world_);
    r.aux = t[0][1].item<double>() / double(world_);
    // Summed over ranks: 1000 per SIGTERM, 1 per SIGINT; every rank then reports the same signal.
    const double sig = t[0][2].item<double>();
    r.signal = sig >= 1000 ? SIGTERM : sig >= 1 ? SIGINT : 0;
  }
}

// train.nan_policy: "stop" throws; "skip" leaves the weights where they are and goes on. Returns whether
// the step was skipped.
bool Trainer::skip_non_finite(const StepResult& r) {
  if (r.finite()) return false;
  std::ostringstream why;
  why << "non-finite training "
      << (!std::isfinite(r.loss)  ? "loss"
          : !std::isfinite(r.aux) ? "aux loss"
                                  : "gradient")
      << " at step " << step_ << " (loss " << r.loss << ", aux " << r.aux << ", grad norm " << r.grad_norm
      << ")";
  if (cfg_.train.nan_policy == "stop")
    throw std::runtime_error(
        why.str() + "; stopped without writing a checkpoint (train.nan_policy = \"stop\")" +
        (summary_.checkpoint.empty() ? "" : "; last good checkpoint: " + summary_.checkpoint));
  log_ << "\n" << why.str() << ": step skipped (train.nan_policy = \"skip\")\n";
  // The weights do not move, but the routers still learn from the batch: a non-finite expert output is
  // exactly the health signal reliability tracking must see (docs/routing.md, hierarchical).
  model_->after_step();
  optim_->zero_grad();
  ++summary_.skipped_steps;
  ++step_;
  return true;
}

// One metrics.jsonl row of the step: losses, learning rate, gradient norm, speed and routing measures.
void Trainer::log_step(const StepResult& r, double tok_s) {
  nlohmann::json j = {{"step", step_},        {"split", "train"}, {"loss", r.loss},
                      {"aux_loss", r.aux},    {"lr", r.lr},       {"grad_norm", r.grad_norm},
                      {"tokens_per_s", tok_s}};
  nlohmann::json max_vio = nlohmann::json::array(), loads = nlohmann::json::array();
  double mv = 0, dropped = 0, unrouted = 0;
  for (auto& p : r.plans) {
    max_vio.push_back(p.stats.max_vio);
    loads.push_back(p.stats.load);
    mv += p.stats.max_vio / double(r.plans.size());
    dropped += p.stats.dropped_share / double(r.plans.size());
    if (p.stats.n_tokens > 0)
      unrouted +=
          double(p.unrouted_tokens(p.stats.n_tokens)) / double(p.stats.n_tokens) / double(r.plans.size());
  }
  j["max_vio_batch"] = mv;
  j["dropped_share"] = dropped;    // (requested - kept) / requested, mean over MoE layers
  j["unrouted_share"] = unrouted;  // tokens given no expert / tokens, mean over MoE layers
  if (!r.plans.empty()) j["plan_tokens"] = r.plans.front().stats.n_tokens;  // the tokens `load` counts
  j["max_vio_batch_layers"] = max_vio;
  j["load"] = loads;
  if (writer_) metrics_ << j.dump() << "\n";
  check_metrics();
}

// Validation (and held-out) loss and routing measures with the current weights, as metrics rows and one
// line for the log. Every rank evaluates the whole split (so the measures are the global ones); rank 0
// writes them.
std::string Trainer::evaluate_now(int64_t at_step) {
  const auto& tc = cfg_.train;
  summary_.validation = evaluate(model_, data_->validation, tc.batch_size, tc.eval_batches, "validation");
  auto j = summary_.validation->to_json();
  j["step"] = at_step;
  if (writer_) metrics_ << j.dump() << "\n";
  const auto& v = *summary_.validation;
  std::string line = "eval @" + std::to_string(at_step) + ": validation loss " + fmt(v.loss) + " (ppl " +
                     fmt(v.perplexity, 2) + ")";
  if (data_->heldout.size() > 0) {
    summary_.heldout = evaluate(model_, data_->heldout, tc.batch_size, tc.eval_batches, "heldout");
    auto h = summary_.heldout->to_json();
    h["step"] = at_step;
    if (writer_) metrics_ << h.dump() << "\n";
    line += ", held-out loss " + fmt(summary_.heldout->loss) + " (ppl " +
            fmt(summary_.heldout->perplexity, 2) + ")";
  }
  line += ", MaxVio_global " + fmt(v.max_vio_global, 3) + ", specialisation " + fmt(v.specialization, 3);
  if (v.has_ec)
    line += "; expert choice: batch-routed loss " + fmt(v.ec_batch_loss) + ", threshold-routed " +
            fmt(v.ec_threshold_loss) + " (gap " + fmt(v.ec_gap()) + ")";
  if (!v.cluster_domain.empty()) line += "; cluster purity " + fmt(v.cluster_purity, 3);
  check_metrics();
  return line;
}

// One checkpoint per step for the whole group (docs/reliability.md, "Checkpoints"): every rank's expert
// shards gathered, the ranks' state checked equal, then rank 0 writes it atomically, points `latest` at it
// and keeps train.keep_checkpoints; the others wait until it is complete.
std::string Trainer::checkpoint(int64_t at_step) {
  const fs::path dir = ckpt_root_ / step_name(at_step);
  // Expert parallelism: every rank's shards to every rank (a collective, before rank 0 writes), so the
  // checkpoint holds all experts whatever the world size that reads it.
  NamedTensors model_state = gather_state(module_state(*model_), sharding_);
  NamedTensors optim_state = gather_state(optim_->state(), sharding_);
  if (world_ > 1) {
    // The ranks must hold the same state, bit for bit (the same averaged gradients, the same global router
    // feedback); a checkpoint of rank 0's state is then the group's. Checked at every checkpoint.
    const uint64_t digest = dist::module_digest(*model_, &sharding_.names);
    dist::check_same("the model's parameters and router state at step " + std::to_string(at_step),
                     std::to_string(digest));
    std::ostringstream hex;
    hex << std::hex << std::setw(16) << std::setfill('0') << digest;
    log_ << "\ndist: rank " << rank_ << " state digest at step " << at_step << ": " << hex.str()
         << " (the same on every rank)\n";
  }
  // None goes past a step whose checkpoint might not exist.
  if (!writer_) {
    dist::barrier("checkpoint of step " + std::to_string(at_step) + " by rank 0");
    return dir.string();
  }
  Checkpoint c;
  c.step = at_step;
  c.config_toml = cfg_.to_toml();
  c.tokenizer_model = data_->tokenizer->serialized();
  c.model = std::move(model_state);
  c.optimizer = std::move(optim_state);
  c.trainer = {{"rng.cpu", rng_state()}};
  c.trainer_meta = {{"batcher_epoch", std::to_string(batcher_->epoch())},
                    {"batcher_position", std::to_string(batcher_->position())},
                    {"step", std::to_string(at_step)}};
  try {
    save_checkpoint(dir.string(), c);
  } catch (const FileError& e) {
    throw FileError(e.path(), std::string(e.what()).substr(e.path().size() + 2) +
                                  (summary_.checkpoint.empty()
                                       ? "; no checkpoint of this run was written before it"
                                       : "; the last checkpoint of this run is " + summary_.checkpoint));
  }
  write_file_atomic((ckpt_root_ / "latest").string(), step_name(at_step) + "\n");
  prune_checkpoints(ckpt_root_, cfg_.train.keep_checkpoints);
  dist::barrier("checkpoint of step " + std::to_string(at_step) + " by rank 0");
  return dir.string();
}

// What data parallelism cost this rank (docs/distributed.md, "Measured"): payload of its collectives and
// the time it waited on them, the gradient all-reduce apart; rank 0 also writes it to dist.json (moeforge
// bench --dist reads it).
void Trainer::report_communication() {
  const auto c = dist::comm_stats();
  const auto& s = summary_;
  const double steps_run = std::max<double>(1, double(s.step_losses.size() + s.skipped_steps));
  const double secs = std::max(s.seconds, 1e-9);
  const auto& c0 = comm_start_;
  nlohmann::json d = {{"rank", rank_},
                      {"world", world_},
                      {"expert_parallel", cfg_.dist.expert_parallel},
                      {"steps", steps_run},
                      {"step_ms", 1e3 * s.seconds / steps_run},
                      {"tokens_per_s", s.tokens_per_s},
                      {"bytes_per_step", double(c.bytes - c0.bytes) / steps_run},
                      {"collectives_per_step", double(c.calls - c0.calls) / steps_run},
                      {"comm_ms_per_step", 1e3 * (c.seconds - c0.seconds) / steps_run},
                      {"comm_share", (c.seconds - c0.seconds) / secs},
                      {"grad_sync_ms_per_step", 1e3 * grad_sync_seconds_ / steps_run},
                      {"grad_buckets", reducer_->n_buckets()},
                      {"grad_buckets_overlapped_per_step", double(buckets_overlapped_) / steps_run},
                      {"grad_overlap", dist::env().overlap},
                      {"grad_bucket_bytes", dist::env().bucket_bytes},
                      {"a2a_bytes_per_step", double(c.a2a_bytes - c0.a2a_bytes) / steps_run},
                      {"a2a_calls_per_step", double(c.a2a_calls - c0.a2a_calls) / steps_run},
                      {"a2a_ms_per_step", 1e3 * (c.a2a_seconds - c0.a2a_seconds) / steps_run},
                      {"a2a_share", (c.a2a_seconds - c0.a2a_seconds) / secs}};
  log_ << "dist: rank " << rank_ << ": " << fmt(d["bytes_per_step"].get<double>() / 1e6, 3)
       << " MB sent per step in " << fmt(d["collectives_per_step"].get<double>(), 1)
       << " collectives; gradient all-reduce " << fmt(d["grad_sync_ms_per_step"].get<double>(), 2)
       << " ms per step after backward (" << reducer_->n_buckets() << " buckets, "
       << fmt(d["grad_buckets_overlapped_per_step"].get<double>(), 1)
       << " per step started during backward), all collectives "
       << fmt(d["comm_ms_per_step"].get<double>(), 2) << " ms per step ("
       << fmt(100.0 * d["comm_share"].get<double>(), 1) << "% of the training time)";
  if (c.a2a_calls > c0.a2a_calls)
    log_ << "; of which expert-parallel all-to-all " << fmt(d["a2a_bytes_per_step"].get<double>() / 1e6, 3)
         << " MB in " << fmt(d["a2a_calls_per_step"].get<double>(), 1) << " calls, "
         << fmt(d["a2a_ms_per_step"].get<double>(), 2) << " ms per step ("
         << fmt(100.0 * d["a2a_share"].get<double>(), 1) << "% of the training time)";
  log_ << "\n";
  if (writer_) write_file_atomic((fs::path(opt_.out_dir) / "dist.json").string(), d.dump(2) + "\n");
}

// The end of the run: communication figures, then (unless a signal stopped it) the final evaluation and
// checkpoint.
TrainSummary Trainer::finish() {
  if (world_ > 1) report_communication();
  summary_.step = step_;
  summary_.planned_steps = cfg_.train.steps;
  if (summary_.interrupted_by) return summary_;
  if (step_ == cfg_.train.steps || cfg_.train.eval_every > 0) log_ << evaluate_now(step_) << "\n";
  summary_.checkpoint = checkpoint(step_);
  log_ << "checkpoint: " << summary_.checkpoint << "\n";
  return summary_;
}

}  // namespace

BatchLoss training_forward(TransformerLM& model, const Batcher::Batch& batch) {
  const int64_t B = batch.tokens.size(0), S = batch.tokens.size(1) - 1;
  RouteContext ctx;
  ctx.prompt_len = batch.prompt_len;  // instruction rows of one sample: a router may pool the prompt
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

MatmulPrecision run_precision(const TrainConfig& tc, const CpuFeatures& cpu, std::string* what_runs) {
  std::string native;
  const auto p =
      precision_on_this_cpu(tc.precision, cpu, "train.precision", "train.precision = \"fp32\"", &native);
  if (what_runs)
    *what_runs = p == MatmulPrecision::kFloat32
                     ? "precision: fp32"
                     : "precision: bf16 matrix products on " + native +
                           " (LibTorch's oneDNN), float32 master weights, optimiser, router, norms and loss";
  return p;
}

TrainSummary train_model(RunConfig cfg, const TrainOptions& opt, std::ostream& log) {
  return Trainer(std::move(cfg), opt, log).run();
}

}  // namespace moeforge
