// The OpenAI-compatible API of `moeforge serve` without HTTP (docs/serve.md): request bodies parsed and
// checked into a CompletionRequest, the limits a server holds them to, and the bodies of its answers,
// errors included. The HTTP binding (apps/moeforge/serve.cpp) and the fuzz target (fuzz/fuzz_serve.cpp)
// call these; nothing here needs a model.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace moeforge::serve {

// An answer that is an error: its HTTP status and OpenAI's error object, {"error": {"message", "type",
// "param", "code"}}. `param` names the request field at fault ("messages[2].content"), or is empty.
class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string type, std::string param, const std::string& message, std::string code = {})
      : std::runtime_error(message),
        status_(status),
        type_(std::move(type)),
        param_(std::move(param)),
        code_(std::move(code)) {}
  int status() const { return status_; }
  const std::string& type() const { return type_; }
  const std::string& param() const { return param_; }
  const std::string& code() const { return code_; }
  nlohmann::json body() const;

 private:
  int status_;
  std::string type_, param_, code_;
};

// 400 invalid_request_error naming the field.
ApiError invalid_request(const std::string& param, const std::string& message, const std::string& code = {});
// {"error": {...}} for a status the HTTP layer answers itself (404, 405, 413, ...).
nlohmann::json error_body(int status, const std::string& message, const std::string& type = {});

// What one server allows (docs/serve.md, "Limits"); `moeforge serve` flags set them.
struct ServeLimits {
  int64_t max_body_bytes = 1 << 20;  // a request body, in bytes (larger: 413)
  int64_t max_tokens = 256;          // generated tokens per request at most (max_tokens above it: 400)
  int64_t max_prompt_tokens = 0;     // prompt tokens with <s> at most; 0: the model's context - 1
  int64_t max_stop = 4;              // stop sequences per request
  int64_t max_stop_bytes = 64;       // bytes per stop sequence
  int64_t max_messages = 256;        // chat messages per request
  double timeout_s = 60;             // a request's time, queue included; generation ends there
  int64_t max_queue = 16;            // requests waiting for the model (more: 503)
  // Checks the limits themselves (ConfigError naming the flag).
  void validate() const;
};

enum class Endpoint { kCompletions, kChat };

// A parsed and checked request. Sampling as the API names it: temperature in [0, 2] (0 = greedy, as
// `moeforge generate --temperature 0`), top_p in (0, 1], seed, max_tokens (or max_completion_tokens),
// stop (up to ServeLimits::max_stop strings).
struct CompletionRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string model;         // as given (the server has one model; the name is not checked)
  std::string prompt;        // completions: the prompt; chat: the messages' contents, one per line
  int64_t max_tokens = -1;   // -1: not given (completions: 16, chat: ServeLimits::max_tokens)
  double temperature = 1.0;  // the API's default
  double top_p = 1.0;        // the API's default
  bool has_seed = false;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  // The extension field "moeforge": {"routing": true} adds the routing statistics of the response
  // (expert loads per MoE layer), {"trace": true} its per-token trace (model/trace.h).
  bool routing = false, trace = false;
};

// Parses `body` (the JSON text of a POST) for `endpoint`. Malformed JSON, a field of the wrong type, an
// unknown field, a value out of range or past a limit, an unsupported option set to anything but its
// neutral value (n > 1, logprobs, penalties, tools, ...): ApiError 400 naming the field. Never anything
// else, whatever the bytes.
CompletionRequest parse_request(const std::string& body, Endpoint endpoint, const ServeLimits& limits);

// The max_tokens a request gets: its own, else the endpoint's default, never above the limit.
int64_t effective_max_tokens(const CompletionRequest& r, const ServeLimits& limits);

// Answer bodies. `id` ("cmpl-..." / "chatcmpl-..."), `created` (Unix seconds) and `model` head each one;
// `finish_reason` is "stop" (</s> or a stop sequence) or "length" (max_tokens, the context or the time
// limit); usage counts prompt tokens (<s> included) and generated ones. `extension`, when not null, is
// the "moeforge" field (routing statistics, trace).
struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
  nlohmann::json to_json() const;
};
nlohmann::json completion_body(const CompletionRequest& r, const std::string& id, int64_t created,
                               const std::string& model, const std::string& text,
                               const std::string& finish_reason, const Usage& usage,
                               const nlohmann::json& extension);
// One server-sent event's chunk: the text added (`delta`), and on the last one the finish_reason (and,
// when asked, usage and the extension). Chat's first chunk carries the role (`first`).
nlohmann::json chunk_body(const CompletionRequest& r, const std::string& id, int64_t created,
                          const std::string& model, const std::string& delta, bool first,
                          const std::string& finish_reason, const nlohmann::json& extension);
// The usage chunk that closes a stream with stream_options.include_usage (empty choices).
nlohmann::json usage_chunk_body(const CompletionRequest& r, const std::string& id, int64_t created,
                                const std::string& model, const Usage& usage);
// "data: <json>\n\n"
std::string sse_event(const nlohmann::json& j);

}  // namespace moeforge::serve
