// libFuzzer target: the request parser of `moeforge serve` (serve/api.h; docs/serve.md, docs/reliability.md).
// Input: the first byte picks the endpoint (even: /v1/completions, odd: /v1/chat/completions), the rest is
// the request body. Whatever the bytes, parse_request returns a request or throws ApiError with a 4xx
// status; nothing else may escape, and a parsed request must answer with a body that serialises.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "moeforge/serve/api.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  using namespace moeforge::serve;
  const Endpoint ep = data[0] % 2 ? Endpoint::kChat : Endpoint::kCompletions;
  const std::string body(reinterpret_cast<const char*>(data + 1), size - 1);
  ServeLimits limits;
  limits.max_body_bytes = 64 * 1024;
  try {
    const CompletionRequest r = parse_request(body, ep, limits);
    if (effective_max_tokens(r, limits) < 1 || effective_max_tokens(r, limits) > limits.max_tokens)
      std::abort();
    const Usage u{1, 1};
    (void)sse_event(completion_body(r, "cmpl-0", 0, "m", r.prompt, "stop", u, nullptr));
    (void)sse_event(chunk_body(r, "cmpl-0", 0, "m", r.prompt, true, "", nullptr));
  } catch (const ApiError& e) {
    if (e.status() < 400 || e.status() >= 500) std::abort();
    (void)sse_event(e.body());
  }
  return 0;
}
