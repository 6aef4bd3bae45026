// The request parser and answer bodies of `moeforge serve` without HTTP (serve/api.h; docs/serve.md): what
// the API accepts, and every kind of bad input answered with a 4xx naming the field, never anything else.
#include <random>

#include "moeforge/serve/api.h"
#include "test_util.h"

namespace moeforge::serve {
namespace {

CompletionRequest parse(const std::string& body, Endpoint ep = Endpoint::kCompletions, ServeLimits lim = {}) {
  return parse_request(body, ep, lim);
}

// The body is refused with `status`, naming `param` (and saying `says`).
void refused(const std::string& body, const std::string& param, const std::string& says, Endpoint ep,
             int status = 400, ServeLimits lim = {}) {
  SCOPED_TRACE(body.substr(0, 200));
  try {
    parse_request(body, ep, lim);
    ADD_FAILURE() << "accepted";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), status) << e.what();
    EXPECT_EQ(e.param(), param) << e.what();
    EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    const auto b = e.body();
    EXPECT_EQ(b["error"]["message"], e.what());
    EXPECT_TRUE(b["error"]["type"].is_string());
  }
}

TEST(ServeApi, ParsesCompletionAndChatRequests) {
  auto r = parse(R"({"model": "m", "prompt": "Once", "max_tokens": 5, "temperature": 0, "top_p": 0.5,
                     "seed": 7, "stop": ["\n", "."], "stream": true, "stream_options": {"include_usage": true},
                     "n": 1, "user": "u", "presence_penalty": 0, "logprobs": null, "echo": false,
                     "moeforge": {"routing": true, "trace": false}})");
  EXPECT_EQ(r.prompt, "Once");
  EXPECT_EQ(r.max_tokens, 5);
  EXPECT_EQ(r.temperature, 0);
  EXPECT_EQ(r.top_p, 0.5);
  EXPECT_TRUE(r.has_seed);
  EXPECT_EQ(r.seed, 7u);
  EXPECT_EQ(r.stop, (std::vector<std::string>{"\n", "."}));
  EXPECT_TRUE(r.stream && r.include_usage && r.routing && !r.trace);
  EXPECT_EQ(parse(R"({"prompt": ["one"]})").prompt, "one");
  // The API's defaults.
  auto d = parse(R"({"prompt": "x"})");
  EXPECT_EQ(d.temperature, 1.0);
  EXPECT_EQ(d.top_p, 1.0);
  EXPECT_EQ(effective_max_tokens(d, {}), 16);
  auto c = parse(R"({"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]}],
                     "max_completion_tokens": 3, "response_format": {"type": "text"}, "tools": null})",
                 Endpoint::kChat);
  EXPECT_EQ(c.prompt, "Be brief.\nHello!");  // no template: the contents, one per line
  EXPECT_EQ(c.max_tokens, 3);
  ServeLimits lim;
  lim.max_tokens = 100;
  EXPECT_EQ(effective_max_tokens(
                parse(R"({"messages": [{"role": "user", "content": "x"}]})", Endpoint::kChat), lim),
            100);
}

TEST(ServeApi, RefusesMalformedJson) {
  for (const std::string body : {"", "{", "{\"prompt\": }", "nul", "{\"prompt\": \"x\"} trailing", "\xff\xfe",
                                 "{\"prompt\": \"\xc3\x28\"}"})
    refused(body, "", "not valid JSON", Endpoint::kCompletions);
  refused("[1, 2]", "", "must be a JSON object", Endpoint::kCompletions);
  refused("\"text\"", "", "must be a JSON object", Endpoint::kChat);
  refused(std::string(100, '[') + std::string(100, ']'), "", "deeper than", Endpoint::kCompletions);
}

TEST(ServeApi, RefusesWrongTypesNamingTheField) {
  const auto C = Endpoint::kCompletions, H = Endpoint::kChat;
  refused(R"({"prompt": 5})", "prompt", "prompt must be a string", C);
  refused(R"({"prompt": "x", "max_tokens": "5"})", "max_tokens", "must be an integer, got a string", C);
  refused(R"({"prompt": "x", "max_tokens": 5.5})", "max_tokens", "must be an integer, got a number", C);
  refused(R"({"prompt": "x", "temperature": "hot"})", "temperature", "must be a number", C);
  refused(R"({"prompt": "x", "stream": 1})", "stream", "must be a boolean", C);
  refused(R"({"prompt": "x", "stop": 3})", "stop", "a string or an array of strings", C);
  refused(R"({"prompt": "x", "stop": ["a", 3]})", "stop[1]", "must be a string", C);
  refused(R"({"prompt": "x", "seed": 1.5})", "seed", "must be an integer", C);
  refused(R"({"prompt": "x", "model": []})", "model", "must be a string", C);
  refused(R"({"messages": "hi"})", "messages", "an array of messages", H);
  refused(R"({"messages": [3]})", "messages[0]", "must be an object", H);
  refused(R"({"messages": [{"role": "user", "content": 3}]})", "messages[0].content", "a string or an array",
          H);
  refused(R"({"messages": [{"role": 1, "content": "x"}]})", "messages[0].role", "must be a string", H);
  refused(R"({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})",
          "messages[0].content[0].type", "must be \"text\"", H);
  refused(R"({"prompt": "x", "moeforge": {"routing": "yes"}})", "moeforge.routing", "must be a boolean", C);
}

TEST(ServeApi, RefusesUnknownAndUnsupportedFields) {
  const auto C = Endpoint::kCompletions, H = Endpoint::kChat;
  refused(R"({"prompt": "x", "temprature": 0})", "temprature", "unknown field temprature", C);
  refused(R"({"prompt": "x", "messages": []})", "messages", "unknown field", C);  // chat's, not completions'
  refused(R"({"messages": [{"role": "user", "content": "x"}], "prompt": "x"})", "prompt", "unknown field", H);
  refused(R"({"messages": [{"role": "user", "content": "x", "mood": 1}]})", "messages[0].mood",
          "unknown field", H);
  refused(R"({"prompt": "x", "stream": true, "stream_options": {"x": 1}})", "stream_options.x", "unknown", C);
  refused(R"({"prompt": "x", "moeforge": {"experts": true}})", "moeforge.experts", "unknown field", C);
  refused(R"({"prompt": "x", "n": 2})", "n", "one completion per request", C);
  refused(R"({"prompt": "x", "best_of": 3})", "best_of", "must be in [1, 1]", C);
  refused(R"({"prompt": "x", "echo": true})", "echo", "not supported", C);
  refused(R"({"prompt": "x", "logprobs": 2})", "logprobs", "not supported", C);
  refused(R"({"prompt": "x", "presence_penalty": 0.5})", "presence_penalty", "not supported", C);
  refused(R"({"prompt": "x", "logit_bias": {"5": 1}})", "logit_bias", "not supported", C);
  refused(R"({"prompt": ["a", "b"]})", "prompt", "one completion per request", C);
  refused(R"({"messages": [{"role": "tool", "content": "x"}]})", "messages[0].role", "no tools", H);
  refused(R"({"messages": [{"role": "user", "content": "x"}], "tools": [{}]})", "tools", "no tool calls", H);
  refused(R"({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})",
          "response_format", "not supported", H);
  refused(R"({"prompt": "x", "stream_options": {"include_usage": true}})", "stream_options", "stream: true",
          C);
  refused(R"({"max_tokens": 3})", "prompt", "no prompt", C);
  refused(R"({"model": "m"})", "messages", "no messages", H);
  refused(R"({"messages": []})", "messages", "must not be empty", H);
  refused(R"({"messages": [{"content": "x"}]})", "messages[0].role", "has no role", H);
}

TEST(ServeApi, RefusesHugeNumbersAndValuesPastTheLimits) {
  const auto C = Endpoint::kCompletions;
  ServeLimits lim;
  lim.max_tokens = 64;
  refused(R"({"prompt": "x", "max_tokens": 65})", "max_tokens", "--max-tokens", C, 400, lim);
  refused(R"({"prompt": "x", "max_tokens": 0})", "max_tokens", "must be in [1, 64]", C, 400, lim);
  refused(R"({"prompt": "x", "max_tokens": -3})", "max_tokens", "must be in [1, 64]", C, 400, lim);
  refused(R"({"prompt": "x", "max_tokens": 18446744073709551615})", "max_tokens", "at most 64", C, 400, lim);
  refused(R"({"prompt": "x", "max_tokens": 1e300})", "max_tokens", "must be an integer", C, 400, lim);
  refused(R"({"prompt": "x", "max_tokens": 123456789012345678901234567890})", "max_tokens",
          "must be an integer", C, 400, lim);
  refused(R"({"prompt": "x", "temperature": 1e999})", "", "not valid JSON", C);  // out of double's range
  refused(R"({"prompt": "x", "temperature": 2.5})", "temperature", "must be in [0, 2]", C);
  refused(R"({"prompt": "x", "temperature": -0.1})", "temperature", "must be in [0, 2]", C);
  refused(R"({"prompt": "x", "top_p": 0})", "top_p", "must be in (0, 1]", C);
  refused(R"({"prompt": "x", "top_p": 1.5})", "top_p", "must be in (0, 1]", C);
  refused(R"({"prompt": "x", "stop": ""})", "stop", "must not be empty", C);
  refused(R"({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]})", "stop", "at most 4", C);
  refused("{\"prompt\": \"x\", \"stop\": \"" + std::string(65, 'a') + "\"}", "stop", "at most 64", C);
  ServeLimits small;
  small.max_body_bytes = 1024;
  refused("{\"prompt\": \"" + std::string(2000, 'a') + "\"}", "", "at most 1024", C, 413, small);
  ServeLimits few;
  few.max_messages = 2;
  refused(R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
             {"role": "user", "content": "c"}]})",
          "messages", "at most 2", Endpoint::kChat, 400, few);
}

TEST(ServeApi, LimitsAreCheckedNamingTheFlag) {
  ServeLimits l;
  l.max_tokens = 0;
  test::expect_config_error([&] { l.validate(); }, "--max-tokens");
  l = {};
  l.timeout_s = std::nan("");
  test::expect_config_error([&] { l.validate(); }, "--timeout");
  l = {};
  l.max_queue = 0;
  test::expect_config_error([&] { l.validate(); }, "--queue");
  l = {};
  l.max_body_bytes = 10;
  test::expect_config_error([&] { l.validate(); }, "--max-body-bytes");
}

TEST(ServeApi, AnswerBodiesHaveTheApiShape) {
  auto c = parse(R"({"prompt": "x"})");
  Usage u{3, 2};
  auto b = completion_body(c, "cmpl-1", 100, "m", "hello", "length", u, nullptr);
  EXPECT_EQ(b["object"], "text_completion");
  EXPECT_EQ(b["choices"][0]["text"], "hello");
  EXPECT_EQ(b["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(b["usage"]["total_tokens"], 5);
  EXPECT_FALSE(b.contains("moeforge"));
  auto h = parse(R"({"messages": [{"role": "user", "content": "x"}], "stream": true})", Endpoint::kChat);
  auto first = chunk_body(h, "chatcmpl-1", 100, "m", "", true, "", nullptr);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  auto last = chunk_body(h, "chatcmpl-1", 100, "m", "", false, "stop", {{"routing", {{"router", "moce"}}}});
  EXPECT_TRUE(last["choices"][0]["delta"].empty());
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(last["moeforge"]["routing"]["router"], "moce");
  EXPECT_TRUE(usage_chunk_body(h, "chatcmpl-1", 100, "m", u)["choices"].empty());
  EXPECT_EQ(sse_event({{"a", 1}}), "data: {\"a\":1}\n\n");
  EXPECT_EQ(sse_event({{"t", std::string("\xff")}}),
            "data: {\"t\":\"\xef\xbf\xbd\"}\n\n");  // replaced, not thrown
  EXPECT_EQ(error_body(404, "no such endpoint")["error"]["type"], "invalid_request_error");
}

// Random bytes and random edits of a valid request: an ApiError or a request, never anything else (the
// fuzz target fuzz/fuzz_serve.cpp does this at length).
TEST(ServeApi, ArbitraryBytesGiveARequestOrAnApiError) {
  const std::string valid =
      R"({"model": "m", "prompt": "x", "max_tokens": 5, "stop": ["a"], "messages": [{"role": "user", "content": "y"}]})";
  std::mt19937 rng(5);
  for (int i = 0; i < 3000; ++i) {
    std::string s = valid;
    const int edits = 1 + int(rng() % 6);
    for (int k = 0; k < edits; ++k) {
      const size_t at = rng() % (s.size() + 1);
      switch (rng() % 3) {
        case 0:
          s.insert(at, 1, char(rng() % 256));
          break;
        case 1:
          if (at < s.size()) s.erase(at, 1);
          break;
        default:
          if (at < s.size()) s[at] = "{}[]\",:0123456789.eE-tfn\\"[rng() % 25];
      }
    }
    for (auto ep : {Endpoint::kCompletions, Endpoint::kChat}) {
      try {
        parse_request(s, ep, {});
      } catch (const ApiError& e) {
        EXPECT_GE(e.status(), 400);
        EXPECT_LT(e.status(), 500);
      }
    }
  }
}

}  // namespace
}  // namespace moeforge::serve
