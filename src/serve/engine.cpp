// The model side of `moeforge serve` (engine.h; docs/serve.md, "Concurrency").
#include "moeforge/serve/engine.h"

#include <algorithm>
#include <ctime>
#include <random>
#include <sstream>

#include "moeforge/model/generate.h"
#include "moeforge/model/trace.h"
#include "moeforge/routing/stats.h"

namespace moeforge::serve {

namespace {

// The length of the longest prefix of `s` that does not end inside a UTF-8 sequence.
size_t utf8_complete(const std::string& s) {
  size_t n = s.size();
  // Look back at most 3 bytes for the lead byte of a sequence that runs past the end.
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const unsigned char c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte: keep looking for its lead
    const size_t need = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
    return need > back ? n - back : n;
  }
  return n;
}

}  // namespace

Job::Job(CompletionRequest r, std::string id_, int64_t created_, Clock::time_point deadline_)
    : request(std::move(r)), id(std::move(id_)), created(created_), deadline(deadline_) {}

Job::Update Job::wait(size_t from, Clock::time_point until) {
  std::unique_lock<std::mutex> lk(m_);
  cv_.wait_until(lk, until, [&] { return visible_.size() > from || state_ == State::kDone; });
  Update u;
  if (visible_.size() > from) u.delta = visible_.substr(from);
  u.done = state_ == State::kDone;
  return u;
}

bool Job::wait_done(Clock::time_point until) {
  std::unique_lock<std::mutex> lk(m_);
  return cv_.wait_until(lk, until, [&] { return state_ == State::kDone; });
}

void Job::cancel() {
  std::lock_guard<std::mutex> lk(m_);
  cancelled_ = true;
}

bool Job::cancelled() const {
  std::lock_guard<std::mutex> lk(m_);
  return cancelled_;
}

Job::State Job::state() const {
  std::lock_guard<std::mutex> lk(m_);
  return state_;
}

std::string Job::text() const {
  std::lock_guard<std::mutex> lk(m_);
  return text_;
}

std::string Job::finish_reason() const {
  std::lock_guard<std::mutex> lk(m_);
  return finish_;
}

Usage Job::usage() const {
  std::lock_guard<std::mutex> lk(m_);
  return usage_;
}

nlohmann::json Job::extension() const {
  std::lock_guard<std::mutex> lk(m_);
  return extension_;
}

std::optional<ApiError> Job::error() const {
  std::lock_guard<std::mutex> lk(m_);
  return error_;
}

Engine::Engine(LoadedModel& lm, ServeLimits limits, std::string model_id)
    : lm_(lm), limits_(std::move(limits)), model_id_(std::move(model_id)) {
  limits_.validate();
  worker_ = std::thread([this] { work(); });
}

Engine::~Engine() {
  stop();
}

int64_t Engine::context() const {
  return lm_.cfg.model.max_seq_len;
}

std::string Engine::router() const {
  const auto layers = lm_.model->moe_layers();
  return layers.empty() ? std::string("dense") : layers.front()->router->name();
}

std::shared_ptr<Job> Engine::submit(const CompletionRequest& r) {
  {
    std::lock_guard<std::mutex> lk(m_);
    if (stopping_) throw ApiError(503, "server_error", "", "the server is shutting down", "shutting_down");
  }
  std::vector<int64_t> ids;
  {
    std::lock_guard<std::mutex> lk(tok_m_);
    ids = lm_.tokenizer->encode(r.prompt);
  }
  ids.insert(ids.begin(), lm_.tokenizer->bos_id());
  const int64_t ctx = context();
  const int64_t most = limits_.max_prompt_tokens > 0 ? std::min(limits_.max_prompt_tokens, ctx - 1) : ctx - 1;
  if (int64_t(ids.size()) > most)
    throw invalid_request(r.endpoint == Endpoint::kChat ? "messages" : "prompt",
                          "the prompt has " + std::to_string(ids.size()) +
                              " tokens (with <s>), this server takes at most " + std::to_string(most) +
                              " (the model's context is " + std::to_string(ctx) +
                              " tokens, one at least for the answer)",
                          "context_length_exceeded");
  std::lock_guard<std::mutex> lk(m_);
  if (stopping_) throw ApiError(503, "server_error", "", "the server is shutting down", "shutting_down");
  int64_t queued = 0;
  for (const auto& j : queue_) queued += j->state() == Job::State::kQueued;
  if (queued >= limits_.max_queue)
    throw ApiError(503, "server_error", "",
                   "the server is busy: " + std::to_string(queued) +
                       " requests wait for the model already (--queue); retry later",
                   "queue_full");
  std::ostringstream id;
  id << (r.endpoint == Endpoint::kChat ? "chatcmpl-" : "cmpl-") << std::hex << ++next_id_ << "-"
     << (rng_() & 0xffffffffu);
  CompletionRequest req = r;
  if (!req.has_seed) req.seed = rng_();  // a request without a seed draws its own
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(limits_.timeout_s));
  std::shared_ptr<Job> job(new Job(std::move(req), id.str(), int64_t(std::time(nullptr)), deadline));
  job->prompt_ = std::move(ids);
  job->max_tokens_ = effective_max_tokens(r, limits_);
  queue_.push_back(job);
  cv_.notify_all();
  return job;
}

void Engine::stop() {
  {
    std::lock_guard<std::mutex> lk(m_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lk(m_);
  EngineStats s;
  s.queued = int64_t(queue_.size());
  s.running = running_;
  s.served = served_;
  s.failed = failed_;
  s.stopping = stopping_;
  return s;
}

void Engine::work() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lk(m_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and everything accepted is done
      job = queue_.front();
      queue_.pop_front();
      ++running_;
    }
    std::optional<ApiError> failure;
    if (job->cancelled()) {
      failure = ApiError(499, "invalid_request_error", "", "the client closed the request", "cancelled");
    } else if (Clock::now() >= job->deadline) {
      failure =
          ApiError(503, "server_error", "",
                   "the request waited for the model past this server's time limit (--timeout)", "timeout");
    } else {
      {
        std::lock_guard<std::mutex> lk(job->m_);
        job->state_ = Job::State::kRunning;
      }
      try {
        run(*job);
      } catch (const ApiError& e) {
        failure = e;
      } catch (const std::exception& e) {
        failure =
            ApiError(500, "server_error", "", std::string("generation failed: ") + e.what(), "internal");
      }
    }
    {
      std::lock_guard<std::mutex> lk(m_);  // counted before the answer goes out (/health agrees with it)
      --running_;
      ++(failure ? failed_ : served_);
    }
    {
      std::lock_guard<std::mutex> lk(job->m_);
      if (failure) job->error_ = failure;
      job->state_ = Job::State::kDone;
    }
    job->cv_.notify_all();
  }
}

void Engine::run(Job& job) {
  const CompletionRequest& r = job.request;
  const Tokenizer& tok = *lm_.tokenizer;
  const std::vector<int64_t>& prompt = job.prompt_;
  GenerateOptions opt;
  opt.max_tokens = job.max_tokens_;
  opt.temperature = r.temperature;
  opt.top_p = r.top_p;
  opt.seed = r.seed;
  opt.eos_id = tok.eos_id();

  size_t hold = 0;  // bytes held back while they could be the start of a stop sequence
  for (const auto& s : r.stop) hold = std::max(hold, s.size() - 1);
  std::string before;
  {
    std::lock_guard<std::mutex> lk(tok_m_);
    before = tok.decode(prompt);
  }
  std::vector<int64_t> out;
  // The continuation as `moeforge generate` prints it after the prompt (cli_util.cpp, sample_text): what
  // decoding prompt and new tokens together adds to the prompt's own decoding.
  auto continuation = [&] {
    std::vector<int64_t> all = prompt;
    all.insert(all.end(), out.begin(), out.end());
    std::lock_guard<std::mutex> lk(tok_m_);
    const std::string whole = tok.decode(all);
    if (whole.compare(0, before.size(), before) == 0) return whole.substr(before.size());
    return tok.decode(out);
  };
  std::string text;
  bool stop_sequence = false, timed_out = false;
  auto cut_at_stop = [&] {
    size_t cut = std::string::npos;
    for (const auto& s : r.stop) cut = std::min(cut, text.find(s));
    if (cut == std::string::npos) return false;
    text.resize(cut);
    return true;
  };
  auto publish = [&](size_t keep_back) {
    size_t n = text.size() > keep_back ? text.size() - keep_back : 0;
    n = utf8_complete(text.substr(0, n));
    bool grew = false;
    {
      std::lock_guard<std::mutex> lk(job.m_);
      // Only text that extends what was sent is sent (a decoding that changed an earlier piece waits for
      // the final answer).
      if (n > job.visible_.size() && text.compare(0, job.visible_.size(), job.visible_) == 0) {
        job.visible_ = text.substr(0, n);
        grew = true;
      }
    }
    if (grew) job.cv_.notify_all();  // a streaming HTTP thread waits in Job::wait for this text
  };

  const bool routing = r.routing || r.trace;
  std::vector<std::vector<int64_t>> load;  // [MoE layer][expert]
  int64_t routed = 0;
  nlohmann::json records = nlohmann::json::array();
  std::optional<RoutingTracer> tracer;
  if (r.trace) tracer.emplace(*lm_.model, &tok);

  GenerateHooks hooks;
  hooks.on_step = [&](const torch::Tensor& input, int64_t start, const LMOutput& res) {
    if (!routing) return;
    routed += input.numel();
    if (load.empty()) load.resize(res.plans.size());
    for (size_t l = 0; l < res.plans.size(); ++l) {
      const auto off = res.plans[l].offsets();
      load[l].resize(std::max(load[l].size(), off.size() - 1), 0);
      for (size_t e = 0; e + 1 < off.size(); ++e) load[l][e] += off[e + 1] - off[e];
    }
    if (tracer) {
      std::lock_guard<std::mutex> lk(tok_m_);
      for (auto& rec : tracer->step(input, start, res, {}, int64_t(prompt.size())))
        records.push_back(std::move(rec));
    }
  };
  hooks.on_token = [&](int64_t t) {
    if (t == opt.eos_id) return false;  // the end: no text
    out.push_back(t);
    text = continuation();
    stop_sequence = cut_at_stop();
    publish(stop_sequence ? 0 : hold);
    if (stop_sequence) return false;
    if (job.cancelled()) return false;
    if (Clock::now() >= job.deadline) {
      timed_out = true;
      return false;
    }
    return true;
  };
  GenerateStop why = GenerateStop::kMaxTokens;
  const auto generated = generate(lm_.model, prompt, opt, &why, hooks);
  const bool eos = why == GenerateStop::kEos;
  if (!stop_sequence) {
    text = continuation();  // out holds every token but </s>
    stop_sequence = cut_at_stop();
  }

  nlohmann::json ext;
  if (routing) {
    ext = nlohmann::json::object();
    if (r.routing) {
      const auto header = trace_header(*lm_.model, "serve");
      nlohmann::json layers = nlohmann::json::array();
      for (size_t l = 0; l < load.size(); ++l) {
        std::vector<double> ld(load[l].begin(), load[l].end());
        layers.push_back(
            {{"layer", header["moe_layers"][l]}, {"load", load[l]}, {"max_vio", max_violation(ld)}});
      }
      ext["routing"] = {{"router", header["router"]}, {"routed_tokens", routed}, {"layers", layers}};
    }
    if (r.trace) ext["trace"] = {{"header", trace_header(*lm_.model, "serve")}, {"tokens", records}};
  }
  if (timed_out) ext["stopped"] = "the time limit (--timeout) ended the generation";
  std::lock_guard<std::mutex> lk(job.m_);
  job.text_ = text;
  if (text.compare(0, job.visible_.size(), job.visible_) == 0) job.visible_ = text;
  job.finish_ = eos || stop_sequence ? "stop" : "length";
  job.usage_.prompt_tokens = int64_t(prompt.size());
  job.usage_.completion_tokens = int64_t(generated.size());
  job.extension_ = ext;
}

}  // namespace moeforge::serve
