// `moeforge serve` as its users meet it (docs/serve.md): the built CLI serves a tiny MoCE checkpoint (a
// router neither GGUF nor HF can express) on a loopback port; the official `openai` npm client gets the
// greedy text `moeforge generate` prints, plain and streamed; curl's bad inputs each get a 4xx with an
// OpenAI-style error body; a client gone mid-stream, a slow client and a full queue leave the server
// serving; SIGTERM finishes the request in flight. Also the trace commands end to end: generate --trace,
// eval --trace, trace-view --png.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <thread>

#include "moeforge/config/run_config.h"
#include "moeforge/util/runtime.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

// Starts `program` with `args` in `dir`, stdout and stderr to <label>.out / <label>.err there.
pid_t spawn(const std::string& program, const std::vector<std::string>& args, const fs::path& dir,
            const std::string& label) {
  const pid_t pid = fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // a test killed by its time limit leaves no server behind
    if (::chdir(dir.c_str()) != 0) _exit(126);
    const int out = ::open((label + ".out").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err = ::open((label + ".err").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(out, 1);
    ::dup2(err, 2);
    std::vector<char*> argv;
    std::string prog = program;
    argv.push_back(prog.data());
    for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execvp(prog.c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

struct Result {
  int code = -1;
  std::string out, err;
};

int wait_code(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

Result run(const std::string& program, const std::vector<std::string>& args, const fs::path& dir,
           const std::string& label = "run") {
  Result r;
  r.code = wait_code(spawn(program, args, dir, label));
  r.out = slurp(dir / (label + ".out"));
  r.err = slurp(dir / (label + ".err"));
  return r;
}

Result cli(const std::vector<std::string>& args, const fs::path& dir, const std::string& label = "cli") {
  return run(MOEFORGE_CLI, args, dir, label);
}

fs::path fresh(const std::string& name) {
  const auto d = fs::path(::testing::TempDir()) / ("moeforge_serve_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// The tiny checkpoint these tests serve: MoCE (2 clusters of 4 experts, top-2 inside the cluster), a
// 64-token context, trained for a few steps on the tests' tiny corpus; made once per machine.
std::string tiny_checkpoint() {
  static const std::string dir = test::shared_test_dir("moeforge_serve_model_v1", [](const fs::path& root) {
    fs::create_directories(root);
    const auto cfg = load_run_config_text(
        "", "test",
        test::tiny_run_overrides("serve", {"moe.router=\"moce\"", "moe.n_expert=8", "moe.n_expert_used=2",
                                           "moe.n_cluster=2", "data.seq_len=64", "train.steps=30"}));
    std::ofstream(root / "serve.toml") << cfg.to_toml();
    const auto r = cli({"train", "--config", (root / "serve.toml").string(), "--out", (root / "run").string(),
                        "--no-report"},
                       root, "train");
    if (r.code != 0) throw std::runtime_error("training the tiny model failed: " + r.err);
  });
  return (fs::path(dir) / "run" / "checkpoints").string();
}

// A raw HTTP/1.1 exchange on loopback (Connection: close): status, headers and the body, de-chunked.
struct Http {
  int status = 0;
  std::string headers, body;
};

int connect_to(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(uint16_t(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  timeval tv{120, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

std::string request_text(const std::string& method, const std::string& path, const std::string& body) {
  return method + " " + path +
         " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body;
}

std::string dechunk(const std::string& s) {
  std::string out;
  size_t at = 0;
  while (at < s.size()) {
    const size_t nl = s.find("\r\n", at);
    if (nl == std::string::npos) break;
    const size_t n = std::stoul(s.substr(at, nl - at), nullptr, 16);
    if (n == 0) break;
    out += s.substr(nl + 2, n);
    at = nl + 2 + n + 2;
  }
  return out;
}

Http http(int port, const std::string& method, const std::string& path, const std::string& body = "") {
  Http h;
  const int fd = connect_to(port);
  if (fd < 0) return h;
  const std::string req = request_text(method, path, body);
  ::send(fd, req.data(), req.size(), MSG_NOSIGNAL);
  std::string all;
  char buf[65536];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) all.append(buf, size_t(n));
  ::close(fd);
  const size_t end = all.find("\r\n\r\n");
  if (all.rfind("HTTP/1.1 ", 0) != 0 || end == std::string::npos) return h;
  h.status = std::stoi(all.substr(9, 3));
  h.headers = all.substr(0, end);
  h.body = all.substr(end + 4);
  if (contains(h.headers, "Transfer-Encoding: chunked")) h.body = dechunk(h.body);
  return h;
}

nlohmann::json json_of(const std::string& s) {
  return nlohmann::json::parse(s, nullptr, false);
}

// The text of a stream of server-sent events: the concatenated deltas (chat) or texts (completions).
struct Events {
  std::string text;
  int chunks = 0;
  bool done = false;
  nlohmann::json last, error;
};
Events read_events(const std::string& body) {
  Events e;
  size_t at = 0;
  while ((at = body.find("data: ", at)) != std::string::npos) {
    const size_t end = body.find("\n\n", at);
    const std::string data = body.substr(at + 6, end - at - 6);
    at = end;
    if (data == "[DONE]") {
      e.done = true;
      continue;
    }
    auto j = json_of(data);
    if (j.contains("error")) e.error = j;
    if (!j.contains("choices") || j["choices"].empty()) continue;
    ++e.chunks;
    const auto& c = j["choices"][0];
    if (c.contains("delta") && c["delta"].contains("content"))
      e.text += c["delta"]["content"].get<std::string>();
    if (c.contains("text")) e.text += c["text"].get<std::string>();
    e.last = j;
  }
  return e;
}

// `moeforge serve` on a free loopback port.
class Server {
 public:
  Server(const std::string& name, const std::vector<std::string>& extra = {}) : dir_(fresh(name)) {
    std::vector<std::string> args = {"serve", "--checkpoint", tiny_checkpoint(), "--port", "0"};
    args.insert(args.end(), extra.begin(), extra.end());
    pid_ = spawn(MOEFORGE_CLI, args, dir_, "serve");
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(300);
    static const std::regex re("on http://127\\.0\\.0\\.1:([0-9]+)");
    while (std::chrono::steady_clock::now() < until) {
      std::smatch m;
      const std::string out = slurp(dir_ / "serve.out");
      if (std::regex_search(out, m, re)) {
        port_ = std::stoi(m[1]);
        return;
      }
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ADD_FAILURE() << "the server did not start: " << slurp(dir_ / "serve.err");
  }
  ~Server() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  int port() const { return port_; }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  const fs::path& dir() const { return dir_; }
  // SIGTERM, then the exit code (the server finishes what is in flight first).
  int terminate() {
    ::kill(pid_, SIGTERM);
    const int code = wait_code(pid_);
    pid_ = -1;
    return code;
  }
  std::string out() const { return slurp(dir_ / "serve.out"); }
  std::string err() const { return slurp(dir_ / "serve.err"); }

 private:
  fs::path dir_;
  pid_t pid_ = -1;
  int port_ = 0;
};

const std::string kPrompt = "the dog";

// What `moeforge generate` prints for kPrompt, greedy: the prompt, its continuation, a newline.
std::string generated(const fs::path& dir, int max_tokens, const std::string& dtype = "fp32") {
  const auto r = cli({"generate", "--checkpoint", tiny_checkpoint(), "--prompt", kPrompt, "--max-tokens",
                      std::to_string(max_tokens), "--temperature", "0", "--dtype", dtype},
                     dir, "generate");
  EXPECT_EQ(r.code, 0) << r.err;
  return r.out;
}

// The official client (`openai` from npm, scripts/install-openai-client.sh; the CTest fixture installs it):
// a greedy completion and a greedy streamed chat completion give the text `moeforge generate` prints.
TEST(Serve, OfficialClientGetsTheTextOfGenerate) {
  const fs::path client = fs::path(MOEFORGE_SOURCE_DIR) / ".cache" / "openai-client";
  ASSERT_TRUE(fs::exists(client / "node-path")) << "scripts/install-openai-client.sh installs the client";
  std::string node = slurp(client / "node-path");
  while (!node.empty() && (node.back() == '\n' || node.back() == '\r')) node.pop_back();
  Server s("client");
  ASSERT_GT(s.port(), 0);
  const int n = 12;
  const std::string expected = generated(s.dir(), n);
  const auto r = run(node,
                     {(fs::path(MOEFORGE_SOURCE_DIR) / "scripts" / "serve-openai-client.cjs").string(),
                      (client / "node_modules").string(), s.url() + "/v1", kPrompt, std::to_string(n)},
                     s.dir(), "node");
  ASSERT_EQ(r.code, 0) << r.err << "\nserver: " << s.err();
  const auto j = json_of(r.out);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_EQ(j["models"], nlohmann::json::array({"run"}));
  EXPECT_EQ(kPrompt + j["completion"].get<std::string>() + "\n", expected);
  EXPECT_EQ(kPrompt + j["chat_stream"].get<std::string>() + "\n",
            expected);  // the chat prompt is the message
  EXPECT_GE(j["chat_stream_chunks"].get<int>(), 2);
  EXPECT_EQ(j["chat_stream_role"], "assistant");
  EXPECT_TRUE(j["completion_finish"] == "length" || j["completion_finish"] == "stop");
  EXPECT_EQ(j["chat_stream_usage"]["completion_tokens"], j["completion_usage"]["completion_tokens"]);
  EXPECT_EQ(j["refused_status"], 400);
  EXPECT_EQ(j["refused_param"], "max_tokens");
  // The same through curl, plain and streamed.
  const auto plain = http(s.port(), "POST", "/v1/completions",
                          R"({"prompt": ")" + kPrompt + R"(", "max_tokens": 12, "temperature": 0})");
  ASSERT_EQ(plain.status, 200) << plain.body;
  EXPECT_EQ(kPrompt + json_of(plain.body)["choices"][0]["text"].get<std::string>() + "\n", expected);
  const auto streamed =
      http(s.port(), "POST", "/v1/completions",
           R"({"prompt": ")" + kPrompt + R"(", "max_tokens": 12, "temperature": 0, "stream": true})");
  ASSERT_EQ(streamed.status, 200);
  EXPECT_TRUE(contains(streamed.headers, "text/event-stream")) << streamed.headers;
  const auto ev = read_events(streamed.body);
  EXPECT_TRUE(ev.done);
  EXPECT_EQ(kPrompt + ev.text + "\n", expected);
  // Seeded sampling is reproducible.
  const std::string seeded =
      R"({"prompt": "the", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 5})";
  EXPECT_EQ(json_of(http(s.port(), "POST", "/v1/completions", seeded).body)["choices"][0]["text"],
            json_of(http(s.port(), "POST", "/v1/completions", seeded).body)["choices"][0]["text"]);
}

struct Curl {
  int status = 0;
  nlohmann::json body;
  std::string raw;
};

// curl -X METHOD URL [-d BODY]: the status and the body.
Curl curl(const Server& s, const std::string& method, const std::string& path, const std::string& body = "",
          const std::vector<std::string>& extra = {}) {
  std::vector<std::string> args = {
      "-sS", "-o", "body", "-w", "%{http_code}", "-X", method, "-H", "Content-Type: application/json"};
  if (!body.empty() || method == "POST") {
    std::ofstream(s.dir() / "request") << body;
    args.push_back("--data-binary");
    args.push_back("@request");
  }
  args.insert(args.end(), extra.begin(), extra.end());
  args.push_back(s.url() + path);
  const auto r = run("curl", args, s.dir(), "curl");
  Curl c;
  EXPECT_EQ(r.code, 0) << "curl: " << r.err;
  c.status = std::atoi(r.out.c_str());
  c.raw = slurp(s.dir() / "body");
  c.body = json_of(c.raw);
  return c;
}

// Each bad input is a 4xx with {"error": {"message", "type", "param", "code"}}, and the server goes on.
TEST(Serve, BadInputIsA4xxWithAnErrorBody) {
  Server s("bad", {"--max-body-bytes", "4096", "--max-tokens", "32"});
  ASSERT_GT(s.port(), 0);
  struct Case {
    std::string what, path, body;
    int status;
    std::string param, says;
  };
  const std::vector<Case> cases = {
      {"malformed JSON", "/v1/completions", R"({"prompt": "x",)", 400, "", "not valid JSON"},
      {"not an object", "/v1/chat/completions", "[]", 400, "", "must be a JSON object"},
      {"wrong type", "/v1/completions", R"({"prompt": "x", "max_tokens": "ten"})", 400, "max_tokens",
       "must be an integer"},
      {"wrong message type", "/v1/chat/completions", R"({"messages": [{"role": "user", "content": 7}]})", 400,
       "messages[0].content", "a string or an array"},
      {"unknown field", "/v1/completions", R"({"prompt": "x", "temprature": 0.5})", 400, "temprature",
       "unknown field"},
      {"huge number", "/v1/completions", R"({"prompt": "x", "max_tokens": 99999999999999999999999})", 400,
       "max_tokens", "must be an integer"},
      {"past the limit", "/v1/completions", R"({"prompt": "x", "max_tokens": 33})", 400, "max_tokens",
       "--max-tokens"},
      {"number overflow", "/v1/completions", R"({"prompt": "x", "temperature": 1e400})", 400, "",
       "not valid JSON"},
      {"prompt past the context", "/v1/completions",
       "{\"prompt\": \"" +
           [] {
             std::string p;
             for (int i = 0; i < 200; ++i) p += "the dog runs ";
             return p;
           }() +
           "\"}",
       400, "prompt", "context"},
      {"unsupported option", "/v1/chat/completions",
       R"({"messages": [{"role": "user", "content": "x"}], "n": 3})", 400, "n", "one completion"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    const auto r = curl(s, "POST", c.path, c.body);
    EXPECT_EQ(r.status, c.status) << r.raw;
    ASSERT_TRUE(r.body.is_object() && r.body.contains("error")) << r.raw;
    const auto& e = r.body["error"];
    EXPECT_EQ(e["type"], "invalid_request_error");
    EXPECT_TRUE(contains(e["message"].get<std::string>(), c.says)) << e["message"];
    if (c.param.empty())
      EXPECT_TRUE(e["param"].is_null()) << e;
    else
      EXPECT_EQ(e["param"], c.param);
  }
  {
    SCOPED_TRACE("context code");
    const auto r = curl(s, "POST", "/v1/completions", cases[8].body);
    EXPECT_EQ(r.body["error"]["code"], "context_length_exceeded") << r.raw;
  }
  {
    SCOPED_TRACE("body too large");
    const auto r = curl(s, "POST", "/v1/completions", "{\"prompt\": \"" + std::string(8000, 'a') + "\"}");
    EXPECT_EQ(r.status, 413) << r.raw;
    EXPECT_TRUE(r.body.contains("error")) << r.raw;
  }
  {
    SCOPED_TRACE("no such endpoint");
    const auto r = curl(s, "POST", "/v1/embeddings", "{}");
    EXPECT_EQ(r.status, 404) << r.raw;
    EXPECT_TRUE(contains(r.body["error"]["message"].get<std::string>(), "/v1/embeddings"));
    EXPECT_EQ(curl(s, "GET", "/v1/completions").status, 404);
  }
  {
    SCOPED_TRACE("not UTF-8");
    const auto r = curl(s, "POST", "/v1/completions", "{\"prompt\": \"\xff\xfe\"}");
    EXPECT_EQ(r.status, 400) << r.raw;
  }
  // Still serving, and it counted nothing as served.
  const auto h = curl(s, "GET", "/health");
  EXPECT_EQ(h.status, 200);
  EXPECT_EQ(h.body["status"], "ok");
  EXPECT_EQ(h.body["served"], 0);
  EXPECT_EQ(curl(s, "GET", "/v1/models").body["data"][0]["moeforge"]["router"], "moce");
  EXPECT_EQ(s.terminate(), 0) << s.err();
}

// A client that leaves in the middle of a stream, one that sends half a request and stalls, and one that
// never reads: each is closed, and the worker goes on to the next request.
TEST(Serve, ClientsThatLeaveOrStallDoNotStopTheServer) {
  Server s("gone", {"--io-timeout", "1"});
  ASSERT_GT(s.port(), 0);
  const std::string long_stream =
      R"({"prompt": "the", "max_tokens": 60, "temperature": 1, "seed": 1, "stream": true})";
  for (int i = 0; i < 3; ++i) {
    const int fd = connect_to(s.port());
    ASSERT_GE(fd, 0);
    const std::string req = request_text("POST", "/v1/completions", long_stream);
    ::send(fd, req.data(), req.size(), MSG_NOSIGNAL);
    char buf[256];
    EXPECT_GT(::recv(fd, buf, sizeof buf, 0), 0);  // the stream has begun
    ::close(fd);                                   // and the client is gone
  }
  {
    // Half a request, then nothing: closed after --io-timeout.
    const int fd = connect_to(s.port());
    const std::string half =
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"";
    ::send(fd, half.data(), half.size(), MSG_NOSIGNAL);
    const auto t0 = std::chrono::steady_clock::now();
    char buf[256];
    while (::recv(fd, buf, sizeof buf, 0) > 0) {
    }
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(30));
    ::close(fd);
  }
  {
    // A client that sends a streamed request and never reads: the server's writes stall, time out and close.
    const int fd = connect_to(s.port());
    int small = 1024;
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    const std::string req = request_text("POST", "/v1/completions", long_stream);
    ::send(fd, req.data(), req.size(), MSG_NOSIGNAL);
    std::this_thread::sleep_for(std::chrono::seconds(2));
    ::close(fd);
  }
  const auto ok = http(s.port(), "POST", "/v1/completions", R"({"prompt": "the", "max_tokens": 4})");
  EXPECT_EQ(ok.status, 200) << ok.body;
  const auto h = json_of(http(s.port(), "GET", "/health").body);
  EXPECT_EQ(h["status"], "ok");
  EXPECT_EQ(h["running"], 0);
  EXPECT_EQ(s.terminate(), 0) << s.err();
}

// Concurrent requests are queued to the one model worker and all answered (greedy ones alike); past the
// queue's limit a request gets 503 with an error body, and the others are still answered.
TEST(Serve, ConcurrentRequestsAreQueuedAndAFullQueueSays503) {
  {
    Server s("concurrent");
    ASSERT_GT(s.port(), 0);
    std::vector<Http> answers(8);
    std::vector<std::thread> clients;
    for (size_t i = 0; i < answers.size(); ++i)
      clients.emplace_back([&, i] {
        answers[i] = http(s.port(), "POST", "/v1/completions",
                          R"({"prompt": "the cat", "max_tokens": 10, "temperature": 0})");
      });
    for (auto& c : clients) c.join();
    for (const auto& a : answers) {
      ASSERT_EQ(a.status, 200) << a.body;
      EXPECT_EQ(json_of(a.body)["choices"][0]["text"], json_of(answers[0].body)["choices"][0]["text"]);
    }
    EXPECT_EQ(json_of(http(s.port(), "GET", "/health").body)["served"], 8);
    EXPECT_EQ(s.terminate(), 0);
  }
  Server s("queue", {"--queue", "1", "--http-threads", "8"});
  ASSERT_GT(s.port(), 0);
  // Eight requests sent at once (all written before any answer is read), each some 60 tokens long: one runs,
  // one may wait, the rest find the queue full.
  const std::string req = request_text("POST", "/v1/completions",
                                       R"({"prompt": "the", "max_tokens": 60, "temperature": 1, "seed": 3})");
  std::vector<int> fds;
  for (int i = 0; i < 8; ++i) fds.push_back(connect_to(s.port()));
  for (int fd : fds) ::send(fd, req.data(), req.size(), MSG_NOSIGNAL);
  int ok = 0, busy = 0;
  for (int fd : fds) {
    std::string all;
    char buf[65536];
    for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) all.append(buf, size_t(n));
    ::close(fd);
    if (all.rfind("HTTP/1.1 200", 0) == 0) ++ok;
    if (all.rfind("HTTP/1.1 503", 0) == 0) {
      ++busy;
      EXPECT_EQ(json_of(all.substr(all.find("\r\n\r\n") + 4))["error"]["code"], "queue_full") << all;
    }
  }
  EXPECT_EQ(ok + busy, 8);
  EXPECT_GE(ok, 1);
  EXPECT_GE(busy, 1);  // 8 at once with room for 2
  const auto h = json_of(http(s.port(), "GET", "/health").body);
  EXPECT_EQ(h["served"], ok);
  EXPECT_EQ(s.terminate(), 0);
}

// The extension field: routing statistics (expert loads per MoE layer) and the per-token trace.
TEST(Serve, RoutingStatisticsAndTraceOnRequest) {
  Server s("routing");
  ASSERT_GT(s.port(), 0);
  const auto a = http(
      s.port(), "POST", "/v1/completions",
      R"({"prompt": "the dog", "max_tokens": 6, "temperature": 0, "moeforge": {"routing": true, "trace": true}})");
  ASSERT_EQ(a.status, 200) << a.body;
  const auto j = json_of(a.body);
  const auto& routing = j["moeforge"]["routing"];
  EXPECT_EQ(routing["router"], "moce");
  const int64_t routed = routing["routed_tokens"].get<int64_t>();
  EXPECT_EQ(routed,
            j["usage"]["prompt_tokens"].get<int64_t>() + j["usage"]["completion_tokens"].get<int64_t>() - 1);
  ASSERT_EQ(routing["layers"].size(), 2u);  // both blocks are MoE
  for (const auto& l : routing["layers"]) {
    int64_t sum = 0;
    for (const auto& n : l["load"]) sum += n.get<int64_t>();
    EXPECT_EQ(sum, 2 * routed);  // top-2: two experts per token
  }
  const auto& tokens = j["moeforge"]["trace"]["tokens"];
  ASSERT_EQ(int64_t(tokens.size()), routed);
  EXPECT_TRUE(tokens[0]["layers"][0].contains("cluster"));
  // Without asking, no extension.
  EXPECT_FALSE(
      json_of(http(s.port(), "POST", "/v1/completions", R"({"prompt": "the", "max_tokens": 2})").body)
          .contains("moeforge"));
  // Streamed: on the last chunk.
  const auto st = http(
      s.port(), "POST", "/v1/chat/completions",
      R"({"messages": [{"role": "user", "content": "the"}], "max_tokens": 4, "stream": true, "moeforge": {"routing": true}})");
  const auto ev = read_events(st.body);
  EXPECT_TRUE(ev.done);
  EXPECT_EQ(ev.last["moeforge"]["routing"]["router"], "moce");
}

// A stream sends the text as it is generated, not all at the end: a generation of some 60 tokens (well
// under a second on this model) arrives as several text events. (The HTTP thread that writes the events
// must be woken by each new piece of text, not only by the job's end or its one-second wait.)
TEST(Serve, StreamSendsTextAsItIsGenerated) {
  Server s("streaming");
  ASSERT_GT(s.port(), 0);
  const auto st = http(s.port(), "POST", "/v1/completions",
                       R"({"prompt": "the", "max_tokens": 60, "temperature": 1, "seed": 1, "stream": true,)"
                       R"( "stream_options": {"include_usage": true}})");
  ASSERT_EQ(st.status, 200) << st.body;
  int text_events = 0;
  int64_t tokens = 0;
  size_t at = 0;
  while ((at = st.body.find("data: {", at)) != std::string::npos) {
    const size_t end = st.body.find("\n\n", at);
    const auto j = json_of(st.body.substr(at + 6, end - at - 6));
    at = end;
    if (j.contains("usage")) tokens = j["usage"]["completion_tokens"].get<int64_t>();
    if (!j["choices"].empty() && !j["choices"][0]["text"].get<std::string>().empty()) ++text_events;
  }
  ASSERT_GE(tokens, 10) << "the test needs a longer generation: " << st.body;
  EXPECT_GE(text_events, 2) << tokens << " tokens came as one piece of text: " << st.body;
  EXPECT_EQ(s.terminate(), 0);
}

// SIGTERM: the server stops accepting, finishes the request in flight (its stream ends with [DONE]) and
// exits 0 saying so.
TEST(Serve, SigtermFinishesTheRequestInFlight) {
  Server s("sigterm");
  ASSERT_GT(s.port(), 0);
  std::atomic<bool> started{false};
  Http answer;
  std::thread client([&] {
    const int fd = connect_to(s.port());
    const std::string req =
        request_text("POST", "/v1/completions",
                     R"({"prompt": "the", "max_tokens": 60, "temperature": 1, "seed": 9, "stream": true})");
    ::send(fd, req.data(), req.size(), MSG_NOSIGNAL);
    std::string all;
    char buf[4096];
    for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;) {
      all.append(buf, size_t(n));
      started = true;
    }
    ::close(fd);
    answer.status = all.rfind("HTTP/1.1 200", 0) == 0 ? 200 : 0;
    answer.body = dechunk(all.substr(all.find("\r\n\r\n") + 4));
  });
  while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(s.terminate(), 0) << s.err();
  client.join();
  EXPECT_EQ(answer.status, 200);
  EXPECT_TRUE(read_events(answer.body).done) << answer.body;
  EXPECT_TRUE(contains(s.out(), "stopped by SIGTERM")) << s.out();
  EXPECT_EQ(connect_to(s.port()), -1);  // no longer listening
}

// --dtype bf16 (docs/performance.md, "bf16 inference"): the server answers with the text of `generate
// --dtype bf16`, where the CPU has bf16 products.
TEST(Serve, Bf16WeightsServeTheTextOfGenerateInBf16) {
  if (bf16_support(read_cpu_features()).empty())
    GTEST_SKIP() << "this CPU has no native bf16: --dtype bf16 is refused";
  Server s("bf16", {"--dtype", "bf16"});
  ASSERT_GT(s.port(), 0);
  EXPECT_TRUE(contains(s.err(), "weights: bf16")) << s.err();
  const auto plain = http(s.port(), "POST", "/v1/completions",
                          R"({"prompt": ")" + kPrompt + R"(", "max_tokens": 10, "temperature": 0})");
  ASSERT_EQ(plain.status, 200) << plain.body;
  EXPECT_EQ(kPrompt + json_of(plain.body)["choices"][0]["text"].get<std::string>() + "\n",
            generated(s.dir(), 10, "bf16"));
}

TEST(Serve, BadFlagsAndCheckpointsAreErrorsNotCrashes) {
  const auto d = fresh("flags");
  auto r = cli({"serve", "--checkpoint", tiny_checkpoint(), "--max-tokens", "0"}, d);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "--max-tokens")) << r.err;
  r = cli({"serve", "--checkpoint", (d / "nothing").string()}, d);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "nothing")) << r.err;
  r = cli({"serve", "--checkpoint", tiny_checkpoint(), "--dtype", "bf17"}, d);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "--dtype")) << r.err;
  Server s("busy-port");
  ASSERT_GT(s.port(), 0);
  r = cli({"serve", "--checkpoint", tiny_checkpoint(), "--port", std::to_string(s.port())}, d);
  EXPECT_EQ(r.code, 1);
  EXPECT_TRUE(contains(r.err, "--port")) << r.err;
}

// The trace commands end to end: generate --trace prints the same text and writes one record per token,
// eval --trace writes documents with their domains, trace-view draws both (and a PNG).
TEST(TraceCli, GenerateEvalAndTraceView) {
  const auto d = fresh("trace_cli");
  const std::string ckpt = tiny_checkpoint();
  const std::vector<std::string> gen = {"generate", "--checkpoint", ckpt, "--prompt",
                                        kPrompt,    "--max-tokens", "8",  "--temperature",
                                        "0",        "--ignore-eos"};
  const auto plain = cli(gen, d, "plain");
  auto traced_args = gen;
  traced_args.insert(traced_args.end(), {"--trace", (d / "gen.jsonl").string()});
  const auto traced = cli(traced_args, d, "traced");
  ASSERT_EQ(traced.code, 0) << traced.err;
  EXPECT_EQ(traced.out, plain.out);
  std::vector<nlohmann::json> lines;
  {
    std::ifstream in(d / "gen.jsonl");
    for (std::string l; std::getline(in, l);) lines.push_back(json_of(l));
  }
  ASSERT_GE(lines.size(), 10u);
  EXPECT_EQ(lines[0]["moeforge_trace"], 1);
  EXPECT_EQ(lines[0]["router"], "moce");
  std::string text;
  for (size_t i = 1; i < lines.size(); ++i) {
    EXPECT_EQ(lines[i]["pos"], int64_t(i) - 1);
    text += lines[i]["text"].get<std::string>();
  }
  EXPECT_EQ("<s>" + plain.out, text + "\n");  // <s>, the prompt and the 8 new tokens: the printed text
  EXPECT_FALSE(lines.back()["routed"].get<bool>());
  const auto ev = cli(
      {"eval", "--checkpoint", ckpt, "--batches", "1", "--trace", (d / "eval.jsonl").string()}, d, "eval");
  ASSERT_EQ(ev.code, 0) << ev.err;
  EXPECT_TRUE(contains(ev.out, "routing trace of ")) << ev.out;
  std::ifstream in(d / "eval.jsonl");
  std::string header, first;
  std::getline(in, header);
  std::getline(in, first);
  EXPECT_TRUE(json_of(header)["domains"].is_array()) << header;
  EXPECT_TRUE(json_of(first)["domain"].is_string()) << first;
  for (const auto* name : {"gen", "eval"}) {
    SCOPED_TRACE(name);
    const auto page = d / (std::string(name) + ".html"), png = d / (std::string(name) + ".png");
    const auto v = cli({"trace-view", (d / (std::string(name) + ".jsonl")).string(), "--out", page.string(),
                        "--png", png.string(), "--width", "800", "--height", "600"},
                       d, "view");
    ASSERT_EQ(v.code, 0) << v.err;
    EXPECT_TRUE(contains(slurp(page), "moeforge-render-check"));
    EXPECT_GT(fs::file_size(png), 1000u);
  }
  EXPECT_TRUE(contains(slurp(d / "eval.html"), "domain &times; expert"));
  std::ofstream(d / "bad.jsonl") << "{\"pos\": 1}\n";
  const auto bad =
      cli({"trace-view", (d / "bad.jsonl").string(), "--out", (d / "bad.html").string()}, d, "bad");
  EXPECT_EQ(bad.code, 1);
  EXPECT_TRUE(contains(bad.err, "bad.jsonl: line 1: not a routing trace")) << bad.err;
}

}  // namespace
}  // namespace moeforge
