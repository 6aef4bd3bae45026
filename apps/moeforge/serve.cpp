// moeforge serve: a checkpoint behind an OpenAI-compatible HTTP API (docs/serve.md), over Debian's
// cpp-httplib. Every router serves, those the GGUF and HF formats cannot express included: the model is
// moeforge's own. The HTTP-independent part (parsing, checks, answer bodies, the queue and the model
// worker) is serve/ (api.h, engine.h); this file binds it to HTTP.
#include <httplib.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <mutex>
#include <thread>
#include <utility>

#include "cli_util.h"
#include "command.h"
#include "moeforge/model/load.h"
#include "moeforge/serve/api.h"
#include "moeforge/serve/engine.h"
#include "moeforge/util/error.h"
#include "moeforge/util/interrupt.h"

namespace moeforge::cli {

namespace {

using nlohmann::json;
using serve::ApiError;
using serve::Clock;
using serve::Endpoint;
using serve::Engine;
using serve::Job;

struct ServeArgs {
  std::string checkpoint, host = "127.0.0.1", model_name, dtype = "fp32";
  int port = 8080;
  int http_threads = 16;
  int io_timeout_s = 10;
  bool log = false;
  serve::ServeLimits limits;
};

std::string dumped(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

void send_json(httplib::Response& res, int status, const json& j) {
  res.status = status;
  res.set_content(dumped(j), "application/json");
}

void send_error(httplib::Response& res, const ApiError& e) {
  send_json(res, e.status(), e.body());
}

bool loopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

// The model's name in answers: --model-name, else the run folder the checkpoint is in.
std::string model_name_of(const std::string& given, const std::string& dir) {
  if (!given.empty()) return given;
  std::filesystem::path p = std::filesystem::weakly_canonical(dir);
  while (p.has_parent_path() && p != p.root_path()) {
    const std::string n = p.filename().string();
    if (!n.empty() && n != "checkpoints" && n.rfind("step", 0) != 0 && n != "latest" && n != "best") return n;
    p = p.parent_path();
  }
  return "moeforge";
}

// What one streamed answer has sent so far.
struct StreamState {
  size_t sent = 0;
  bool first = true, finished = false;
};

// The server-sent events of a streamed answer (docs/serve.md, "Streaming"): one chunk per piece of text,
// an SSE comment every second while there is none (so a client that left is noticed), the last chunk
// with the finish reason (and the extension), the usage chunk when asked, then [DONE]. An error after the
// stream began is an event {"error": ...}. A write that fails (the client is gone, or too slow past the
// write timeout) cancels the job: the worker stops at its next token.
bool stream_step(Engine& engine, const std::shared_ptr<Job>& job, StreamState& st, httplib::DataSink& sink) {
  if (st.finished) {
    sink.done();
    return true;
  }
  const auto& r = job->request;
  auto write = [&](const std::string& s) {
    if (sink.write(s.data(), s.size())) return true;
    job->cancel();
    return false;
  };
  const auto until = std::min(Clock::now() + std::chrono::seconds(1), job->deadline);
  auto u = job->wait(st.sent, until);
  if (!u.delta.empty()) {
    if (!write(serve::sse_event(
            serve::chunk_body(r, job->id, job->created, engine.model_id(), u.delta, st.first, "", nullptr))))
      return false;
    st.sent += u.delta.size();
    st.first = false;
  }
  if (!u.done) {
    if (Clock::now() >= job->deadline && job->state() == Job::State::kQueued) {
      job->cancel();  // never started: the worker drops it
      write(serve::sse_event(
          ApiError(503, "server_error", "", "the request waited for the model past --timeout", "timeout")
              .body()));
      write("data: [DONE]\n\n");
      st.finished = true;
      return true;
    }
    return u.delta.empty() ? write(": waiting\n\n") : true;
  }
  if (auto e = job->error()) {
    write(serve::sse_event(e->body()));
  } else {
    if (st.first)  // chat's role chunk, when no text came
      write(serve::sse_event(
          serve::chunk_body(r, job->id, job->created, engine.model_id(), "", true, "", nullptr)));
    write(serve::sse_event(serve::chunk_body(r, job->id, job->created, engine.model_id(), "", false,
                                             job->finish_reason(), job->extension())));
    if (r.include_usage)
      write(serve::sse_event(
          serve::usage_chunk_body(r, job->id, job->created, engine.model_id(), job->usage())));
  }
  write("data: [DONE]\n\n");
  st.finished = true;
  return true;
}

// Counts a completion request from its arrival to the end of its answer (a stream's: its last event), so
// that a stop waits for it (docs/serve.md, "Stopping").
struct InFlight {
  explicit InFlight(std::atomic<int64_t>& n) : n_(&n) { n_->fetch_add(1); }
  ~InFlight() {
    if (n_) n_->fetch_sub(1);
  }
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;
  // The count is now the caller's to lower (a stream's: its resource releaser).
  std::atomic<int64_t>* release() { return std::exchange(n_, nullptr); }

 private:
  std::atomic<int64_t>* n_;
};

void handle_completion(Engine& engine, Endpoint endpoint, const httplib::Request& req, httplib::Response& res,
                       std::atomic<int64_t>& in_flight) {
  InFlight counted(in_flight);
  std::shared_ptr<Job> job;
  try {
    job = engine.submit(serve::parse_request(req.body, endpoint, engine.limits()));
  } catch (const ApiError& e) {
    send_error(res, e);
    return;
  }
  if (job->request.stream) {
    auto st = std::make_shared<StreamState>();
    Engine* eng = &engine;
    std::atomic<int64_t>* n = counted.release();
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [eng, job, st](size_t /*offset*/, httplib::DataSink& sink) {
          return stream_step(*eng, job, *st, sink);
        },
        [job, n](bool success) {
          if (!success) job->cancel();
          n->fetch_sub(1);
        });
    return;
  }
  // The whole answer. A job still queued at its deadline is dropped here; a running one ends at its
  // deadline by itself (the worker checks it at every token), so the wait past it is short.
  while (!job->wait_done(job->deadline)) {
    if (job->state() == Job::State::kQueued) {
      job->cancel();
      send_error(res, ApiError(503, "server_error", "", "the request waited for the model past --timeout",
                               "timeout"));
      return;
    }
    if (!job->wait_done(job->deadline + std::chrono::seconds(60))) {
      job->cancel();
      send_error(res, ApiError(500, "server_error", "", "the generation did not end after its time limit",
                               "timeout"));
      return;
    }
    break;
  }
  if (auto e = job->error()) {
    send_error(res, *e);
    return;
  }
  send_json(res, 200,
            serve::completion_body(job->request, job->id, job->created, engine.model_id(), job->text(),
                                   job->finish_reason(), job->usage(), job->extension()));
}

int run_serve(ServeArgs& a) {
  a.limits.validate();
  if (a.port < 0 || a.port > 65535) throw ConfigError("--port", "must be in [0, 65535] (0: any free port)");
  if (a.http_threads < 1 || a.http_threads > 1024)
    throw ConfigError("--http-threads", "must be in [1, 1024]");
  if (a.io_timeout_s < 1 || a.io_timeout_s > 3600)
    throw ConfigError("--io-timeout", "must be in [1, 3600] seconds");
  auto lm = load_model(a.checkpoint);
  apply_dtype(lm, a.dtype);
  Engine engine(lm, a.limits, model_name_of(a.model_name, lm.dir));
  const int64_t started = int64_t(std::time(nullptr));
  ::signal(SIGPIPE, SIG_IGN);         // a client gone is a failed write, not the end of the server
  std::atomic<int64_t> in_flight{0};  // completion requests not yet answered to their end (InFlight)

  httplib::Server svr;
  const int threads = a.http_threads;
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  // SO_REUSEADDR only: cpp-httplib's default adds SO_REUSEPORT, with which a second server binds the same
  // port and the two share its connections.
  svr.set_socket_options([](int sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });
  svr.set_payload_max_length(size_t(a.limits.max_body_bytes));
  svr.set_read_timeout(a.io_timeout_s, 0);
  svr.set_write_timeout(a.io_timeout_s, 0);
  svr.set_keep_alive_timeout(5);
  svr.set_keep_alive_max_count(1000);
  std::mutex log_m;
  if (a.log)
    svr.set_logger([&log_m](const httplib::Request& req, const httplib::Response& res) {
      std::lock_guard<std::mutex> lk(log_m);
      std::cerr << "serve: " << req.method << " " << req.path << " " << res.status << "\n";
    });
  // Whatever the HTTP layer answers itself (404, 405, 413, a malformed request line) gets an OpenAI-style
  // body; answers that have one keep it.
  svr.set_error_handler(
      httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
        if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
        std::string msg = "HTTP " + std::to_string(res.status);
        if (res.status == 404) msg = "no such endpoint: " + clipped(req.method + " " + req.path, 200);
        if (res.status == 413) msg = "the request body is larger than this server takes (--max-body-bytes)";
        send_json(res, res.status, serve::error_body(res.status, msg));
        return httplib::Server::HandlerResponse::Handled;
      }));
  svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "internal error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    send_json(res, 500, serve::error_body(500, clipped(what, 300)));
  });

  svr.Get("/health", [&engine](const httplib::Request&, httplib::Response& res) {
    const auto s = engine.stats();
    send_json(res, s.stopping ? 503 : 200,
              {{"status", s.stopping ? "stopping" : "ok"},
               {"model", engine.model_id()},
               {"router", engine.router()},
               {"queued", s.queued},
               {"running", s.running},
               {"served", s.served},
               {"failed", s.failed}});
  });
  auto model_object = [&engine, &lm, started] {
    return json{
        {"id", engine.model_id()},
        {"object", "model"},
        {"created", started},
        {"owned_by", "moeforge"},
        {"moeforge", {{"router", engine.router()}, {"context", engine.context()}, {"checkpoint", lm.dir}}}};
  };
  svr.Get("/v1/models", [model_object](const httplib::Request&, httplib::Response& res) {
    send_json(res, 200, {{"object", "list"}, {"data", json::array({model_object()})}});
  });
  svr.Get(R"(/v1/models/(.+))", [&engine, model_object](const httplib::Request& req, httplib::Response& res) {
    if (req.matches[1] == engine.model_id())
      send_json(res, 200, model_object());
    else
      send_json(res, 404,
                serve::error_body(404, "no model " + clipped(req.matches[1], 100) + " (this server has " +
                                           engine.model_id() + ")"));
  });
  svr.Post("/v1/completions", [&engine, &in_flight](const httplib::Request& req, httplib::Response& res) {
    handle_completion(engine, Endpoint::kCompletions, req, res, in_flight);
  });
  svr.Post("/v1/chat/completions",
           [&engine, &in_flight](const httplib::Request& req, httplib::Response& res) {
             handle_completion(engine, Endpoint::kChat, req, res, in_flight);
           });

  int port = a.port;
  if (port == 0) {
    port = svr.bind_to_any_port(a.host);
    if (port <= 0) throw ConfigError("--host", "cannot listen on " + a.host + " (any port)");
  } else if (!svr.bind_to_port(a.host, port)) {
    throw ConfigError("--port", "cannot listen on " + a.host + ":" + std::to_string(port) + " (in use?)");
  }
  if (!loopback(a.host))
    std::cerr << "moeforge serve: warning: listening on " << a.host
              << ", not loopback: whoever reaches it can use the model (no authentication)\n";
  std::cout << "moeforge serve: " << engine.model_id() << " (router " << engine.router() << ", context "
            << engine.context() << ") on http://" << a.host << ":" << port << " (queue " << a.limits.max_queue
            << ", max_tokens " << a.limits.max_tokens << ", timeout " << a.limits.timeout_s << " s)"
            << std::endl;

  // SIGTERM / SIGINT: take no new requests (503), finish what is in flight, exit 0 (docs/serve.md,
  // "Stopping").
  install_stop_handlers();
  std::atomic<bool> listening{true};
  std::thread watcher([&] {
    // Once, and only while the server listens (a stop before listen_after_bind starts would be lost).
    while (listening) {
      if (stop_signal() != 0 && svr.is_running()) {
        // The engine refuses new jobs and finishes the accepted ones (each ends by its deadline), then the
        // answers still being written end, streams included, before the server stops: cpp-httplib ends a
        // chunked answer where it is once the server stops. A client that does not read is dropped by the
        // write timeout, so the wait is bounded.
        engine.stop();
        const auto until = Clock::now() + std::chrono::seconds(2 * a.io_timeout_s + 5);
        while (in_flight > 0 && Clock::now() < until)
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        svr.stop();
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  svr.listen_after_bind();
  listening = false;
  watcher.join();
  engine.stop();
  const auto s = engine.stats();
  std::cout << "moeforge serve: stopped"
            << (stop_signal() == SIGTERM ? " by SIGTERM"
                : stop_signal()          ? " by SIGINT"
                                         : "")
            << " after " << s.served << " answers (" << s.failed << " failed or dropped)" << std::endl;
  return 0;
}

}  // namespace

Command add_serve(CLI::App& app, const Globals& /*g*/) {
  auto a = std::make_shared<ServeArgs>();
  auto* c =
      app.add_subcommand("serve", "serve a checkpoint over an OpenAI-compatible HTTP API (docs/serve.md)");
  c->add_option("--checkpoint", a->checkpoint, "checkpoint folder")->required();
  add_dtype_option(c, a->dtype);
  c->add_option("--host", a->host, "address to listen on (default loopback)");
  c->add_option("--port", a->port, "port (0: any free one, printed)");
  c->add_option("--model-name", a->model_name, "the model's id in answers (default: the run folder's name)");
  c->add_option("--max-tokens", a->limits.max_tokens, "generated tokens per request at most");
  c->add_option("--max-prompt-tokens", a->limits.max_prompt_tokens,
                "prompt tokens (with <s>) at most (0: the model's context - 1)");
  c->add_option("--max-body-bytes", a->limits.max_body_bytes, "request body bytes at most");
  c->add_option("--timeout", a->limits.timeout_s, "seconds a request may take, queue included");
  c->add_option("--queue", a->limits.max_queue, "requests waiting for the model at most (more: 503)");
  c->add_option("--http-threads", a->http_threads,
                "connections served at once (the rest wait to be accepted)");
  c->add_option("--io-timeout", a->io_timeout_s,
                "seconds a client may take to send a request or read an answer");
  c->add_flag("--log", a->log, "one line per request on stderr");
  return {c, [a] { return run_serve(*a); }};
}

}  // namespace moeforge::cli
