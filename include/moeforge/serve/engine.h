// The model side of `moeforge serve` (docs/serve.md, "Concurrency"): one worker thread owns the model and
// runs one generation at a time, in the order requests arrive (a queue, not batching: a TransformerLM
// forward is not safe to run from two threads at once, and a batch of generations would route each
// sequence with its neighbours for the routers whose routing depends on the batch). HTTP threads submit a
// checked request and wait on its Job: for the whole answer, or for each piece of text as it is generated.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "moeforge/model/load.h"
#include "moeforge/serve/api.h"

namespace moeforge::serve {

using Clock = std::chrono::steady_clock;

// One request between the HTTP thread that waits on it and the worker that generates it.
class Job {
 public:
  enum class State { kQueued, kRunning, kDone };

  // What the HTTP side reads: text past `from` bytes once there is some, the job done, or `until`.
  struct Update {
    std::string delta;
    bool done = false;
  };
  Update wait(size_t from, Clock::time_point until);
  // Waits until the job is done or `until`; true when done.
  bool wait_done(Clock::time_point until);
  // The client is gone or its time is up: a queued job is dropped, a running one ends at its next token.
  void cancel();
  bool cancelled() const;
  State state() const;

  // Once done: the continuation (stop sequence cut), "stop" / "length", the token counts, the "moeforge"
  // extension (null unless asked for), or the error that ended it.
  std::string text() const;
  std::string finish_reason() const;
  Usage usage() const;
  nlohmann::json extension() const;
  std::optional<ApiError> error() const;

  const CompletionRequest request;
  const std::string id;   // "cmpl-..." / "chatcmpl-..."
  const int64_t created;  // Unix seconds
  const Clock::time_point deadline;

 private:
  friend class Engine;
  Job(CompletionRequest r, std::string id, int64_t created, Clock::time_point deadline);
  mutable std::mutex m_;
  std::condition_variable cv_;
  State state_ = State::kQueued;
  bool cancelled_ = false;
  std::string visible_;  // text that may be sent: never shrinks, never ends inside a stop sequence's prefix
  std::string text_, finish_;
  Usage usage_;
  nlohmann::json extension_;
  std::optional<ApiError> error_;
  std::vector<int64_t> prompt_;
  int64_t max_tokens_ = 0;
};

// What /health reports.
struct EngineStats {
  int64_t queued = 0, running = 0, served = 0, failed = 0;
  bool stopping = false;
};

class Engine {
 public:
  // `lm` must outlive the engine; the engine is its only user while it runs. `model_id` names it in
  // answers and /v1/models.
  Engine(LoadedModel& lm, ServeLimits limits, std::string model_id);
  ~Engine();  // stop()
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Tokenizes the prompt (<s> first, as `moeforge generate`), checks it against the model's context and
  // the limits (ApiError 400, code context_length_exceeded), and queues the request (ApiError 503 when
  // the queue is full or the engine is stopping). The job's deadline is now + limits.timeout_s.
  std::shared_ptr<Job> submit(const CompletionRequest& r);
  // No new jobs; the queued and running ones finish; the worker is joined. Idempotent.
  void stop();

  EngineStats stats() const;
  const std::string& model_id() const { return model_id_; }
  const ServeLimits& limits() const { return limits_; }
  int64_t context() const;
  std::string router() const;

 private:
  void work();
  void run(Job& job);
  LoadedModel& lm_;
  const ServeLimits limits_;
  const std::string model_id_;
  mutable std::mutex m_;
  std::mutex tok_m_;  // the tokenizer, between HTTP threads (encoding) and the worker (decoding)
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::mt19937_64 rng_{std::random_device{}()};  // ids, and the seeds of requests without one
  bool stopping_ = false;
  int64_t running_ = 0, served_ = 0, failed_ = 0, next_id_ = 0;
  std::thread worker_;
};

}  // namespace moeforge::serve
