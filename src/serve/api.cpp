// The OpenAI-compatible API without HTTP (api.h; docs/serve.md).
#include "moeforge/serve/api.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "moeforge/util/error.h"

namespace moeforge::serve {

namespace {

using nlohmann::json;

// Nesting deeper than this is refused before parsing (no request needs more than 4 levels).
constexpr int kMaxDepth = 32;

std::string type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return "an integer";
    case json::value_t::number_float:
      return "a number";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    default:
      return "a value";
  }
}

std::string shown(const json& v) {
  return clipped(v.dump(-1, ' ', false, json::error_handler_t::replace), 60);
}

[[noreturn]] void wrong_type(const std::string& param, const json& v, const std::string& wanted) {
  throw invalid_request(param, param + " must be " + wanted + ", got " + type_name(v), "invalid_type");
}

// The deepest nesting of arrays and objects in `text`, counted outside strings (a JSON text's structure
// without parsing it); stops counting past kMaxDepth.
int nesting(const std::string& text) {
  int depth = 0, most = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      most = std::max(most, ++depth);
      if (most > kMaxDepth) return most;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return most;
}

bool is_int(const json& v) {
  return v.is_number_integer() || v.is_number_unsigned();
}

// An integer field in [lo, hi]; a float, a string or a number past int64 is refused naming the field.
int64_t int_field(const std::string& param, const json& v, int64_t lo, int64_t hi,
                  const std::string& why_hi) {
  if (!is_int(v)) wrong_type(param, v, "an integer");
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    throw invalid_request(param, param + " is " + shown(v) + ", at most " + std::to_string(hi) + why_hi,
                          "out_of_range");
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi)
    throw invalid_request(param,
                          param + " is " + std::to_string(x) + ", it must be in [" + std::to_string(lo) +
                              ", " + std::to_string(hi) + "]" + (x > hi ? why_hi : std::string()),
                          "out_of_range");
  return x;
}

double number_field(const std::string& param, const json& v) {
  if (!v.is_number()) wrong_type(param, v, "a number");
  const double x = v.get<double>();
  if (!std::isfinite(x)) throw invalid_request(param, param + " must be a finite number", "out_of_range");
  return x;
}

bool bool_field(const std::string& param, const json& v) {
  if (!v.is_boolean()) wrong_type(param, v, "a boolean");
  return v.get<bool>();
}

const std::string& string_field(const std::string& param, const json& v) {
  if (!v.is_string()) wrong_type(param, v, "a string");
  return v.get_ref<const std::string&>();
}

// Options moeforge does not implement are accepted only at their neutral value.
void neutral_only(const std::string& param, const json& v, bool neutral, const std::string& what) {
  if (!neutral)
    throw invalid_request(param,
                          param + " = " + shown(v) + " is not supported by moeforge serve (" + what + ")",
                          "unsupported_parameter");
}

[[noreturn]] void unknown(const std::string& param) {
  throw invalid_request(param, "unknown field " + clipped(param, 80), "unknown_parameter");
}

// The text of a chat message's content: a string, or an array of {"type": "text", "text": ...} parts.
std::string content_text(const std::string& param, const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (!v.is_array()) wrong_type(param, v, "a string or an array of text parts");
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string p = param + "[" + std::to_string(i) + "]";
    const json& part = v[i];
    if (!part.is_object()) wrong_type(p, part, "an object");
    // The type first (keys iterate sorted): an image part is unsupported before its fields are unknown.
    auto type = part.find("type");
    if (type == part.end()) throw invalid_request(p + ".type", p + " has no type", "missing_parameter");
    if (string_field(p + ".type", *type) != "text")
      throw invalid_request(p + ".type", p + ".type must be \"text\" (moeforge models read text only)",
                            "unsupported_parameter");
    for (auto& [k, x] : part.items()) {
      if (k == "type") {
        continue;
      } else if (k == "text") {
        out += string_field(p + ".text", x);
      } else {
        unknown(p + "." + k);
      }
    }
    if (!part.contains("text")) throw invalid_request(p + ".text", p + " has no text", "missing_parameter");
  }
  return out;
}

std::string messages_prompt(const json& v, const ServeLimits& limits) {
  if (!v.is_array()) wrong_type("messages", v, "an array of messages");
  if (v.empty()) throw invalid_request("messages", "messages must not be empty", "missing_parameter");
  if (int64_t(v.size()) > limits.max_messages)
    throw invalid_request("messages",
                          "messages has " + std::to_string(v.size()) +
                              " entries, this server takes at most " + std::to_string(limits.max_messages),
                          "out_of_range");
  static const std::set<std::string> roles = {"system", "developer", "user", "assistant"};
  std::string prompt;
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string p = "messages[" + std::to_string(i) + "]";
    const json& m = v[i];
    if (!m.is_object()) wrong_type(p, m, "an object");
    bool has_role = false, has_content = false;
    std::string text;
    for (auto& [k, x] : m.items()) {
      if (k == "role") {
        const std::string& role = string_field(p + ".role", x);
        if (!roles.count(role))
          throw invalid_request(p + ".role",
                                p + ".role is \"" + clipped(role, 40) +
                                    "\", expected system, developer, user or assistant (no tools)",
                                "invalid_value");
        has_role = true;
      } else if (k == "content") {
        if (!x.is_null()) text = content_text(p + ".content", x);
        has_content = true;
      } else if (k == "name") {
        string_field(p + ".name", x);
      } else {
        unknown(p + "." + k);
      }
    }
    if (!has_role) throw invalid_request(p + ".role", p + " has no role", "missing_parameter");
    if (!has_content) throw invalid_request(p + ".content", p + " has no content", "missing_parameter");
    // No chat template: moeforge's models have none, so the prompt is the contents, one per line
    // (docs/serve.md, "Chat").
    if (i > 0) prompt += "\n";
    prompt += text;
  }
  return prompt;
}

std::vector<std::string> stop_field(const json& v, const ServeLimits& limits) {
  std::vector<std::string> out;
  auto add = [&](const std::string& p, const json& x) {
    const std::string& s = string_field(p, x);
    if (s.empty()) throw invalid_request(p, p + " must not be empty", "invalid_value");
    if (int64_t(s.size()) > limits.max_stop_bytes)
      throw invalid_request(
          p,
          p + " has " + std::to_string(s.size()) + " bytes, at most " + std::to_string(limits.max_stop_bytes),
          "out_of_range");
    out.push_back(s);
  };
  if (v.is_string()) {
    add("stop", v);
  } else if (v.is_array()) {
    if (int64_t(v.size()) > limits.max_stop)
      throw invalid_request(
          "stop",
          "stop has " + std::to_string(v.size()) + " sequences, at most " + std::to_string(limits.max_stop),
          "out_of_range");
    for (size_t i = 0; i < v.size(); ++i) add("stop[" + std::to_string(i) + "]", v[i]);
  } else {
    wrong_type("stop", v, "a string or an array of strings");
  }
  return out;
}

json finish(const std::string& reason) {
  return reason.empty() ? json(nullptr) : json(reason);
}

}  // namespace

nlohmann::json ApiError::body() const {
  json e = {{"message", what()}, {"type", type_}};
  e["param"] = param_.empty() ? json(nullptr) : json(param_);
  e["code"] = code_.empty() ? json(nullptr) : json(code_);
  return {{"error", e}};
}

ApiError invalid_request(const std::string& param, const std::string& message, const std::string& code) {
  return ApiError(400, "invalid_request_error", param, message, code);
}

nlohmann::json error_body(int status, const std::string& message, const std::string& type) {
  std::string t = type;
  if (t.empty()) t = status >= 500 ? "server_error" : "invalid_request_error";
  return ApiError(status, t, "", message).body();
}

void ServeLimits::validate() const {
  require_config(max_body_bytes >= 1024 && max_body_bytes <= (int64_t(1) << 30), "--max-body-bytes",
                 "must be in [1024, 2^30], got " + std::to_string(max_body_bytes));
  require_config(max_tokens >= 1 && max_tokens <= 1000000, "--max-tokens",
                 "must be in [1, 1000000], got " + std::to_string(max_tokens));
  require_config(max_prompt_tokens >= 0, "--max-prompt-tokens",
                 "must be >= 0 (0: the model's context - 1), got " + std::to_string(max_prompt_tokens));
  require_config(std::isfinite(timeout_s) && timeout_s > 0 && timeout_s <= 86400, "--timeout",
                 "must be a number of seconds in (0, 86400]");
  require_config(max_queue >= 1 && max_queue <= 100000, "--queue",
                 "must be in [1, 100000], got " + std::to_string(max_queue));
}

CompletionRequest parse_request(const std::string& body, Endpoint endpoint, const ServeLimits& limits) {
  if (int64_t(body.size()) > limits.max_body_bytes)
    throw ApiError(413, "invalid_request_error", "",
                   "the request body has " + std::to_string(body.size()) +
                       " bytes, this server takes at most " + std::to_string(limits.max_body_bytes),
                   "request_too_large");
  if (nesting(body) > kMaxDepth)
    throw invalid_request("", "the request nests arrays and objects deeper than " + std::to_string(kMaxDepth),
                          "invalid_json");
  json j;
  try {
    j = json::parse(body);
  } catch (const json::exception& e) {
    const std::string what = e.what();
    const size_t at = what.find("parse error");
    throw invalid_request(
        "", "the request body is not valid JSON: " + (at == std::string::npos ? what : what.substr(at)),
        "invalid_json");
  }
  if (!j.is_object())
    throw invalid_request("", "the request body must be a JSON object, got " + type_name(j), "invalid_json");
  CompletionRequest r;
  r.endpoint = endpoint;
  const bool chat = endpoint == Endpoint::kChat;
  const std::string max_hint = " (this server's --max-tokens)";
  bool has_input = false;
  for (auto& [k, v] : j.items()) {
    if (k == "model") {
      r.model = string_field(k, v);
    } else if (!chat && k == "prompt") {
      if (v.is_string()) {
        r.prompt = v.get<std::string>();
      } else if (v.is_array() && v.size() == 1 && v[0].is_string()) {
        r.prompt = v[0].get<std::string>();
      } else if (v.is_array()) {
        throw invalid_request(
            k, "prompt must be a string or an array of one string (one completion per request)",
            "unsupported_parameter");
      } else {
        wrong_type(k, v, "a string");
      }
      has_input = true;
    } else if (chat && k == "messages") {
      r.prompt = messages_prompt(v, limits);
      has_input = true;
    } else if (k == "max_tokens" || (chat && k == "max_completion_tokens")) {
      if (!v.is_null()) r.max_tokens = int_field(k, v, 1, limits.max_tokens, max_hint);
    } else if (k == "temperature") {
      if (v.is_null()) continue;
      r.temperature = number_field(k, v);
      if (r.temperature < 0 || r.temperature > 2)
        throw invalid_request(k, "temperature is " + shown(v) + ", it must be in [0, 2] (0 = greedy)",
                              "out_of_range");
    } else if (k == "top_p") {
      if (v.is_null()) continue;
      r.top_p = number_field(k, v);
      if (!(r.top_p > 0 && r.top_p <= 1))
        throw invalid_request(k, "top_p is " + shown(v) + ", it must be in (0, 1]", "out_of_range");
    } else if (k == "n") {
      if (!v.is_null()) int_field(k, v, 1, 1, " (one completion per request)");
    } else if (k == "stream") {
      if (!v.is_null()) r.stream = bool_field(k, v);
    } else if (k == "stream_options") {
      if (v.is_null()) continue;
      if (!v.is_object()) wrong_type(k, v, "an object");
      for (auto& [sk, sv] : v.items()) {
        if (sk == "include_usage")
          r.include_usage = bool_field("stream_options.include_usage", sv);
        else
          unknown("stream_options." + sk);
      }
    } else if (k == "stop") {
      if (!v.is_null()) r.stop = stop_field(v, limits);
    } else if (k == "seed") {
      if (v.is_null()) continue;
      if (!is_int(v)) wrong_type(k, v, "an integer");
      r.has_seed = true;
      r.seed = v.is_number_unsigned() ? v.get<uint64_t>() : uint64_t(v.get<int64_t>());
    } else if (k == "user") {
      string_field(k, v);
    } else if (k == "presence_penalty" || k == "frequency_penalty") {
      if (!v.is_null()) neutral_only(k, v, number_field(k, v) == 0, "only 0");
    } else if (k == "logit_bias") {
      if (!v.is_null() && !v.is_object()) wrong_type(k, v, "an object");
      neutral_only(k, v, v.is_null() || v.empty(), "only {}");
    } else if (k == "logprobs") {
      neutral_only(k, v, v.is_null() || (v.is_boolean() && !v.get<bool>()), "no log probabilities");
    } else if (chat && k == "top_logprobs") {
      neutral_only(k, v, v.is_null(), "no log probabilities");
    } else if (!chat && k == "echo") {
      if (!v.is_null()) neutral_only(k, v, !bool_field(k, v), "the answer is the continuation only");
    } else if (!chat && k == "best_of") {
      if (!v.is_null()) int_field(k, v, 1, 1, " (one completion per request)");
    } else if (!chat && k == "suffix") {
      neutral_only(k, v, v.is_null() || (v.is_string() && v.get<std::string>().empty()), "no insertion");
    } else if (chat && k == "response_format") {
      if (v.is_null()) continue;
      if (!v.is_object()) wrong_type(k, v, "an object");
      neutral_only(k, v, v.size() == 1 && v.contains("type") && v["type"] == "text",
                   "only {\"type\": \"text\"}");
    } else if (chat && (k == "tools" || k == "tool_choice" || k == "functions" || k == "function_call")) {
      neutral_only(k, v, v.is_null(), "no tool calls");
    } else if (k == "moeforge") {
      if (v.is_null()) continue;
      if (!v.is_object()) wrong_type(k, v, "an object");
      for (auto& [mk, mv] : v.items()) {
        if (mk == "routing")
          r.routing = bool_field("moeforge.routing", mv);
        else if (mk == "trace")
          r.trace = bool_field("moeforge.trace", mv);
        else
          unknown("moeforge." + mk);
      }
    } else {
      unknown(k);
    }
  }
  if (!has_input) {
    const std::string field = chat ? "messages" : "prompt";
    throw invalid_request(field, "the request has no " + field, "missing_parameter");
  }
  if (r.include_usage && !r.stream)
    throw invalid_request("stream_options", "stream_options is only allowed with stream: true",
                          "invalid_value");
  return r;
}

int64_t effective_max_tokens(const CompletionRequest& r, const ServeLimits& limits) {
  if (r.max_tokens > 0) return std::min(r.max_tokens, limits.max_tokens);
  return r.endpoint == Endpoint::kCompletions ? std::min<int64_t>(16, limits.max_tokens) : limits.max_tokens;
}

nlohmann::json Usage::to_json() const {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens}};
}

nlohmann::json completion_body(const CompletionRequest& r, const std::string& id, int64_t created,
                               const std::string& model, const std::string& text,
                               const std::string& finish_reason, const Usage& usage,
                               const nlohmann::json& extension) {
  const bool chat = r.endpoint == Endpoint::kChat;
  json choice = {{"index", 0}};
  if (chat)
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  else
    choice["text"] = text;
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish(finish_reason);
  json j = {{"id", id},
            {"object", chat ? "chat.completion" : "text_completion"},
            {"created", created},
            {"model", model},
            {"choices", json::array({choice})},
            {"usage", usage.to_json()}};
  if (!extension.is_null()) j["moeforge"] = extension;
  return j;
}

nlohmann::json chunk_body(const CompletionRequest& r, const std::string& id, int64_t created,
                          const std::string& model, const std::string& delta, bool first,
                          const std::string& finish_reason, const nlohmann::json& extension) {
  const bool chat = r.endpoint == Endpoint::kChat;
  json choice = {{"index", 0}};
  if (chat) {
    json d = json::object();
    if (first) d["role"] = "assistant";
    if (!delta.empty() || (first && finish_reason.empty())) d["content"] = delta;
    choice["delta"] = d;
  } else {
    choice["text"] = delta;
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish(finish_reason);
  json j = {{"id", id},
            {"object", chat ? "chat.completion.chunk" : "text_completion"},
            {"created", created},
            {"model", model},
            {"choices", json::array({choice})}};
  if (!extension.is_null()) j["moeforge"] = extension;
  return j;
}

nlohmann::json usage_chunk_body(const CompletionRequest& r, const std::string& id, int64_t created,
                                const std::string& model, const Usage& usage) {
  const bool chat = r.endpoint == Endpoint::kChat;
  return {{"id", id},
          {"object", chat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array()},
          {"usage", usage.to_json()}};
}

std::string sse_event(const nlohmann::json& j) {
  return "data: " + j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n\n";
}

}  // namespace moeforge::serve
