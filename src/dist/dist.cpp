// The process group of a distributed run over c10d's Gloo backend (dist.h, docs/distributed.md).
// USE_C10D_GLOO comes with LibTorch's CMake targets (CMakeLists.txt); without it the Gloo header is empty.
#include "moeforge/dist/dist.h"

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

namespace moeforge::dist {
namespace {

// How often each rank writes its heartbeat into the store, and how long a diagnosis watches the others'
// before it calls a rank stopped: several beats, so that a loaded machine does not look dead.
constexpr auto kBeat = std::chrono::milliseconds(500);
constexpr auto kWatch = std::chrono::milliseconds(2500);

struct State {
  LaunchEnv env;
  bool initialised = false;
  c10::intrusive_ptr<c10d::Store> store;  // rendezvous (rank 0 hosts a TCPStore's server)
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> grad_pg;  // the gradient buckets' own sequence (dist.h)
  // Expert parallelism's groups when 1 < G < W (init_expert_groups); expert_parallel 0: not set, the
  // expert group is the world.
  int expert_parallel = 0;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> experts_pg, replicas_pg;
  struct Pending {
    c10::intrusive_ptr<c10d::Work> work;
    std::string what;
    int64_t bytes = 0;
  };
  std::map<int64_t, Pending> pending;  // started, not yet waited for
  int64_t next_handle = 0;
  std::thread heartbeat;
  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;
  CommStats comm;
  // A process that never called shutdown() (an exception past the CLI, a failed test) must not end in
  // std::terminate for a joinable heartbeat thread.
  ~State() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
    if (heartbeat.joinable()) heartbeat.join();
  }
};

State& state() {
  static State s;
  return s;
}

thread_local bool t_global_batch = false;

// A store client of its own (a c10d TCPStore client is not shared between threads here).
// `member`: one of the W connections the rendezvous counts (rank 0's server waits for all W); the
// heartbeat's and the diagnosis's extra clients are not.
c10::intrusive_ptr<c10d::Store> connect_store(const LaunchEnv& env, bool server, bool member,
                                              std::chrono::milliseconds timeout) {
  // A FileStore removes its file once `numWorkers` instances have closed it; extra clients do not count.
  if (!env.store_file.empty())
    return c10::make_intrusive<c10d::FileStore>(env.store_file, member ? env.world : -1);
  c10d::TCPStoreOptions o;
  o.port = uint16_t(env.master_port);
  o.isServer = server;
  o.numWorkers = member ? c10::optional<size_t>(size_t(env.world)) : c10::nullopt;
  o.waitWorkers = member;
  o.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>(env.master_addr, o);
}

// c10d's own message without the C++ backtrace c10::Error appends to what().
std::string message_of(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

std::string beat_key(int r) {
  return "moeforge/heartbeat/" + std::to_string(r);
}

int64_t read_beat(c10d::Store& store, int r) {
  const std::string key = beat_key(r);
  if (!store.check({key})) return -1;
  auto v = store.get(key);
  return std::stoll(std::string(v.begin(), v.end()));
}

// Why a collective failed, naming the rank(s) to blame: a rank whose heartbeat stopped died or is hung
// (a stopped process beats no more); when the store itself cannot be reached, rank 0, which hosts it, is
// gone. Takes about kWatch.
std::string diagnose() {
  auto& s = state();
  const auto& env = s.env;
  std::ostringstream os;
  try {
    auto store = connect_store(env, false, false, std::chrono::milliseconds(3000));
    std::vector<int64_t> first(size_t(env.world), -1);
    for (int r = 0; r < env.world; ++r)
      if (r != env.rank) first[size_t(r)] = read_beat(*store, r);
    std::this_thread::sleep_for(kWatch);
    std::vector<int> stopped;
    for (int r = 0; r < env.world; ++r)
      if (r != env.rank && read_beat(*store, r) == first[size_t(r)]) stopped.push_back(r);
    if (stopped.empty()) {
      os << "every other rank's process is still alive: one of them is stuck in its work or did not make "
            "this call";
    } else {
      for (size_t i = 0; i < stopped.size(); ++i) os << (i ? ", " : "") << "rank " << stopped[i];
      os << (stopped.size() == 1 ? " has" : " have") << " stopped (no heartbeat for "
         << kWatch.count() / 1000.0 << " s): died, killed or hung";
    }
  } catch (const std::exception&) {
    if (env.store_file.empty())
      os << "rank 0 is gone: the rendezvous store it hosts at " << env.master_addr << ":" << env.master_port
         << " does not answer";
    else
      os << "the rendezvous file " << env.store_file << " cannot be read";
  }
  return os.str();
}

[[noreturn]] void fail(const std::string& what, const std::exception& e) {
  const auto& env = state().env;
  std::ostringstream os;
  os << "distributed: rank " << env.rank << " of " << env.world << ": " << what << " failed: " << diagnose()
     << " (collective timeout " << env.timeout.count() / 1000.0
     << " s, MOEFORGE_DIST_TIMEOUT_S; c10d: " << message_of(e) << ")";
  throw DistError(os.str());
}

// Waits for `work` (a collective of `bytes` payload bytes), counting it in CommStats.
void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& what, int64_t bytes,
          std::chrono::steady_clock::time_point started, bool all_to_all = false) {
  try {
    work->wait(state().env.timeout);
  } catch (const std::exception& e) {
    fail(what, e);
  }
  auto& c = state().comm;
  ++c.calls;
  c.bytes += bytes;
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  c.seconds += took;
  if (all_to_all) {
    ++c.a2a_calls;
    c.a2a_bytes += bytes;
    c.a2a_seconds += took;
  }
}

int64_t nbytes(const std::vector<torch::Tensor>& ts) {
  int64_t n = 0;
  for (auto& t : ts) n += int64_t(t.nbytes());
  return n;
}

int env_int(const char* name, int fallback, int lo, int hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return fallback;
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v, &end, 10);
  if (errno != 0 || *end != 0 || x < lo || x > hi)
    throw DistError(std::string("distributed: environment variable ") + name + " = '" + v +
                    "' is not an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return int(x);
}

bool has_env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != 0;
}

void heartbeat_loop() {
  auto& s = state();
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = connect_store(s.env, false, false, s.env.timeout);
  } catch (const std::exception&) {
    return;  // no heartbeat: a diagnosis then calls this rank stopped, which the failure will bear out
  }
  int64_t n = 0;
  std::unique_lock<std::mutex> lock(s.mu);
  while (!s.stop) {
    lock.unlock();
    try {
      const std::string v = std::to_string(n++);
      store->set(beat_key(s.env.rank), std::vector<uint8_t>(v.begin(), v.end()));
    } catch (const std::exception&) {
      return;  // the store (rank 0) is gone; the main thread's next collective says so
    }
    lock.lock();
    s.cv.wait_for(lock, kBeat, [&] { return s.stop; });
  }
}

// c10d's own threads (the TCPStore client's listener, Gloo's workers) do not catch what they throw: when
// rank 0 dies, the listener of another rank may see its store connection reset before the main thread's
// collective fails, and end the process in std::terminate. This handler says what that means and exits
// like any failed rank (docs/distributed.md, "Failure").
[[noreturn]] void on_terminate() {
  const auto& env = state().env;
  std::string what = "an unknown exception";
  if (auto e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      what = message_of(x);
    } catch (...) {
    }
  }
  std::ostringstream os;
  os << "moeforge: error: distributed: rank " << env.rank << " of " << env.world
     << ": a c10d background thread stopped on '" << what << "': ";
  if (env.rank != 0 && env.store_file.empty())
    os << "rank 0 is gone: the rendezvous store it hosts at " << env.master_addr << ":" << env.master_port
       << " dropped the connection";
  else
    os << "another rank has died or its host is unreachable";
  os << "\n";
  const std::string m = os.str();
  std::fwrite(m.data(), 1, m.size(), stderr);
  std::fflush(stderr);
  std::_Exit(1);
}

// A c10d Gloo group of `size` ranks over the rendezvous store, its keys under `prefix` (blocks until all
// its members have made theirs).
c10::intrusive_ptr<c10d::ProcessGroupGloo> make_group(const LaunchEnv& env,
                                                      const c10::intrusive_ptr<c10d::Store>& store,
                                                      const std::string& prefix, int rank, int size) {
  auto opts = c10d::ProcessGroupGloo::Options::create(env.timeout);
  // Loopback when the rendezvous is on this host; otherwise the interface GLOO_SOCKET_IFNAME names, or
  // the one this host's name resolves to (docs/distributed.md, "Several hosts").
  if (has_env("GLOO_SOCKET_IFNAME"))
    opts->devices.push_back(
        c10d::ProcessGroupGloo::createDeviceForInterface(std::getenv("GLOO_SOCKET_IFNAME")));
  else if (env.master_addr == "127.0.0.1" || env.master_addr == "localhost")
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  else
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  opts->threads = 1;  // one collective at a time; the ranks' compute threads are train.threads
  return c10::make_intrusive<c10d::ProcessGroupGloo>(c10::make_intrusive<c10d::PrefixStore>(prefix, store),
                                                     rank, size, opts);
}

// The expert group's size G (the world until init_expert_groups).
int experts_size() {
  const auto& s = state();
  return s.expert_parallel == 0 ? s.env.world : s.expert_parallel;
}

// The process group for collectives of kind g; null when this rank's group of that kind has one rank.
c10d::ProcessGroupGloo* pg_of(Group g) {
  auto& s = state();
  if (!s.pg) return nullptr;
  const int G = experts_size(), W = s.env.world;
  switch (g) {
    case Group::kWorld:
      return s.pg.get();
    case Group::kExperts:
      return G == 1 ? nullptr : G == W ? s.pg.get() : s.experts_pg.get();
    case Group::kReplicas:
      return G == W ? nullptr : G == 1 ? s.pg.get() : s.replicas_pg.get();
  }
  return nullptr;
}

}  // namespace

LaunchEnv launch_env_from_environment() {
  LaunchEnv e;
  const bool mpi = has_env("OMPI_COMM_WORLD_SIZE");
  const bool torchrun = has_env("WORLD_SIZE");
  if (mpi) {
    e.launcher = "mpirun";
    e.world = env_int("OMPI_COMM_WORLD_SIZE", 1, 1, 1 << 20);
    e.rank = env_int("OMPI_COMM_WORLD_RANK", -1, 0, e.world - 1);
    if (e.rank < 0)
      throw DistError("distributed: OMPI_COMM_WORLD_SIZE is set but OMPI_COMM_WORLD_RANK is not");
    e.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0, 0, e.world - 1);
  } else if (torchrun) {
    e.launcher = "env";
    e.world = env_int("WORLD_SIZE", 1, 1, 1 << 20);
    e.rank = env_int("RANK", -1, 0, e.world - 1);
    if (e.rank < 0) throw DistError("distributed: WORLD_SIZE is set but RANK is not");
    e.local_rank = env_int("LOCAL_RANK", 0, 0, e.world - 1);
  }
  if (has_env("MASTER_ADDR")) e.master_addr = std::getenv("MASTER_ADDR");
  e.master_port = env_int("MASTER_PORT", 29500, 1, 65535);
  if (has_env("MOEFORGE_DIST_STORE_FILE")) e.store_file = std::getenv("MOEFORGE_DIST_STORE_FILE");
  e.timeout = std::chrono::seconds(env_int("MOEFORGE_DIST_TIMEOUT_S", 300, 1, 86400));
  e.bucket_bytes = int64_t(env_int("MOEFORGE_DIST_BUCKET_KB", 1024, 1, 1 << 20)) << 10;
  e.overlap = env_int("MOEFORGE_DIST_OVERLAP", 1, 0, 1) == 1;
  if (e.world == 1) e.launcher = e.launcher == "single" ? "single" : e.launcher;
  return e;
}

void init(const LaunchEnv& env) {
  auto& s = state();
  if (s.initialised) throw DistError("distributed: init() called twice");
  s.env = env;
  s.initialised = true;
  if (env.world <= 1) return;
  try {
    s.store = connect_store(env, env.rank == 0, true, env.timeout);
    s.pg = make_group(env, s.store, "pg", env.rank, env.world);
    s.grad_pg = make_group(env, s.store, "grad", env.rank, env.world);
  } catch (const std::exception& e) {
    std::ostringstream os;
    os << "distributed: rank " << env.rank << " of " << env.world << " could not join the group at "
       << (env.store_file.empty() ? env.master_addr + ":" + std::to_string(env.master_port)
                                  : "file " + env.store_file)
       << " within " << env.timeout.count() / 1000.0
       << " s (MASTER_ADDR, MASTER_PORT, MOEFORGE_DIST_TIMEOUT_S): " << message_of(e);
    s.pg.reset();
    s.grad_pg.reset();
    s.store.reset();
    throw DistError(os.str());
  }
  std::set_terminate(on_terminate);
  s.heartbeat = std::thread(heartbeat_loop);
}

bool active() {
  return state().pg.defined();
}
int rank() {
  return active() ? state().env.rank : 0;
}
int world() {
  return active() ? state().env.world : 1;
}
const LaunchEnv& env() {
  return state().env;
}

void shutdown() {
  auto& s = state();
  const bool was_active = active();
  if (was_active) {
    // Everyone has finished before anyone leaves (a rank that leaves early looks dead to the others).
    try {
      barrier("leaving the group");
    } catch (const DistError&) {
      // A rank that died after the last checkpoint changes nothing about this one's finished work.
    }
  }
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.stop = true;
  }
  s.cv.notify_all();
  if (s.heartbeat.joinable()) s.heartbeat.join();
  s.pending.clear();
  s.experts_pg.reset();
  s.replicas_pg.reset();
  s.expert_parallel = 0;
  s.grad_pg.reset();
  s.pg.reset();
  if (was_active && s.store) {
    // Rank 0 hosts the store: it closes it only after the others have closed their connections to it
    // (a client that sees its server vanish would end its process in c10d's listener thread).
    const std::string key = "moeforge/left";
    try {
      if (s.env.rank != 0) {
        s.store->add(key, 1);
      } else {
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (s.store->add(key, 0) < s.env.world - 1 && std::chrono::steady_clock::now() < until)
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        std::this_thread::sleep_for(std::chrono::milliseconds(200));  // their close after the count
      }
    } catch (const std::exception&) {
    }
  }
  s.store.reset();
  if (was_active) std::set_terminate(nullptr);
}

void init_expert_groups(int expert_parallel) {
  auto& s = state();
  if (!active()) return;
  const int W = s.env.world, r = s.env.rank, G = expert_parallel;
  if (G < 1 || W % G != 0)
    throw DistError("distributed: dist.expert_parallel = " + std::to_string(G) + " does not divide the " +
                    std::to_string(W) + " ranks");
  if (s.expert_parallel != 0) {
    if (s.expert_parallel != G)
      throw DistError("distributed: the expert groups were built for dist.expert_parallel = " +
                      std::to_string(s.expert_parallel) + ", not " + std::to_string(G));
    return;
  }
  if (G > 1 && G < W) {
    try {
      // Every rank builds its expert group first, then its replica group: each group's members all
      // reach it, in that order, so no rank waits on one that is building another.
      s.experts_pg = make_group(s.env, s.store, "experts" + std::to_string(r / G), r % G, G);
      s.replicas_pg = make_group(s.env, s.store, "replicas" + std::to_string(r % G), r / G, W / G);
    } catch (const std::exception& e) {
      fail("building the expert-parallel groups (dist.expert_parallel = " + std::to_string(G) + ")", e);
    }
  }
  s.expert_parallel = G;
}

bool experts_sharded() {
  return active() && state().expert_parallel > 1;
}

int group_size(Group g) {
  if (!active()) return 1;
  const int G = experts_size(), W = state().env.world;
  return g == Group::kWorld ? W : g == Group::kExperts ? G : W / G;
}

int group_rank(Group g) {
  if (!active()) return 0;
  const int G = experts_size(), r = state().env.rank;
  return g == Group::kWorld ? r : g == Group::kExperts ? r % G : r / G;
}

void allreduce_sum(std::vector<torch::Tensor>& tensors, const std::string& what, Group group) {
  auto* pg = pg_of(group);
  if (pg == nullptr) return;
  for (auto& t : tensors) {
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "dist::allreduce_sum: ", what,
                ": tensors must be contiguous CPU tensors");
    std::vector<torch::Tensor> one{t};
    const auto t0 = std::chrono::steady_clock::now();
    wait(pg->allreduce(one, c10d::AllreduceOptions()), "all-reduce of " + what, nbytes(one), t0);
  }
}

void broadcast(std::vector<torch::Tensor>& tensors, int root, const std::string& what) {
  if (!active()) return;
  c10d::BroadcastOptions o;
  o.rootRank = root;
  for (auto& t : tensors) {
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "dist::broadcast: ", what,
                ": tensors must be contiguous CPU tensors");
    std::vector<torch::Tensor> one{t};
    const auto t0 = std::chrono::steady_clock::now();
    wait(state().pg->broadcast(one, o), "broadcast of " + what, nbytes(one), t0);
  }
}

torch::Tensor allgather_cat(const torch::Tensor& t, const std::string& what, Group group) {
  auto* pg = pg_of(group);
  if (pg == nullptr) return t;
  const int W = group_size(group);
  auto x = t.contiguous().cpu();
  // Rows first (they may differ between ranks), then the rows padded to the longest.
  std::vector<torch::Tensor> in{torch::tensor({x.size(0)}, torch::kLong)};
  std::vector<std::vector<torch::Tensor>> out(1);
  for (int r = 0; r < W; ++r) out[0].push_back(torch::empty({1}, torch::kLong));
  auto t0 = std::chrono::steady_clock::now();
  wait(pg->allgather(out, in), "all-gather of the row counts of " + what, nbytes(in), t0);
  std::vector<int64_t> rows;
  int64_t most = 0;
  for (auto& n : out[0]) rows.push_back(n.item<int64_t>()), most = std::max(most, rows.back());
  auto shape = x.sizes().vec();
  shape[0] = most;
  auto padded = torch::zeros(shape, x.options());
  if (x.size(0) > 0) padded.narrow(0, 0, x.size(0)).copy_(x);
  std::vector<torch::Tensor> pin{padded};
  std::vector<std::vector<torch::Tensor>> pout(1);
  for (int r = 0; r < W; ++r) pout[0].push_back(torch::empty(shape, x.options()));
  t0 = std::chrono::steady_clock::now();
  wait(pg->allgather(pout, pin), "all-gather of " + what, nbytes(pin), t0);
  std::vector<torch::Tensor> parts;
  for (int r = 0; r < W; ++r) parts.push_back(pout[0][size_t(r)].narrow(0, 0, rows[size_t(r)]));
  return torch::cat(parts, 0).to(t.device());
}

torch::Tensor all_to_all_rows(const torch::Tensor& x, const std::vector<int64_t>& send_rows,
                              const std::vector<int64_t>& recv_rows, const std::string& what, Group group) {
  auto* pg = pg_of(group);
  if (pg == nullptr) return x;
  const int W = group_size(group);
  TORCH_CHECK(int(send_rows.size()) == W && int(recv_rows.size()) == W, "dist::all_to_all_rows: ", what, ": ",
              send_rows.size(), " send and ", recv_rows.size(), " receive counts for ", W, " ranks");
  auto in = x.contiguous().cpu();
  int64_t total = 0;
  for (int64_t n : recv_rows) total += n;
  auto shape = in.sizes().vec();
  shape[0] = total;
  auto out = torch::empty(shape, in.options());
  auto send = send_rows, recv = recv_rows;  // c10d takes them by non-const reference
  // Bytes that leave this rank (its rows for itself stay in memory).
  const int64_t row_bytes = in.size(0) > 0 ? int64_t(in.nbytes()) / in.size(0) : 0;
  const int64_t leaving = int64_t(in.nbytes()) - send_rows[size_t(group_rank(group))] * row_bytes;
  const auto t0 = std::chrono::steady_clock::now();
  wait(pg->alltoall_base(out, in, recv, send, c10d::AllToAllOptions()), "all-to-all of " + what, leaving, t0,
       /*all_to_all=*/true);
  return out.to(x.device());
}

void barrier(const std::string& what) {
  if (!active()) return;
  // An all-reduce of one number rather than c10d's barrier, whose Gloo form does not take our timeout
  // per call; the effect is the same: nobody passes until everybody has arrived.
  std::vector<torch::Tensor> one{torch::zeros({1}, torch::kLong)};
  const auto t0 = std::chrono::steady_clock::now();
  wait(state().pg->allreduce(one, c10d::AllreduceOptions()), "barrier (" + what + ")", nbytes(one), t0);
}

int64_t start_grad_allreduce(torch::Tensor& t, const std::string& what, Group group) {
  TORCH_CHECK(group != Group::kExperts, "dist::start_grad_allreduce: ", what, ": not over the expert group");
  if (pg_of(group) == nullptr) return -1;
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "dist::start_grad_allreduce: ", what,
              ": the tensor must be a contiguous CPU tensor");
  auto& s = state();
  std::vector<torch::Tensor> one{t};
  const int64_t h = s.next_handle++;
  try {
    // The world's gradients on the world's second group; the replicas' on the replica group (which, when
    // the expert group is one rank, is the world: the second group again).
    auto& pg = group == Group::kReplicas && s.replicas_pg ? s.replicas_pg : s.grad_pg;
    s.pending[h] = {pg->allreduce(one, c10d::AllreduceOptions()), what, nbytes(one)};
  } catch (const std::exception& e) {
    fail("all-reduce of " + what, e);
  }
  return h;
}

void wait_grad_allreduce(int64_t handle) {
  if (handle < 0) return;  // a group of one rank: nothing was started
  auto& s = state();
  auto it = s.pending.find(handle);
  TORCH_CHECK(it != s.pending.end(), "dist::wait_grad_allreduce: no all-reduce ", handle, " in flight");
  auto p = std::move(it->second);
  s.pending.erase(it);
  // What CommStats counts of it is the time this thread waited, not the time it was in flight.
  wait(p.work, "all-reduce of " + p.what, p.bytes, std::chrono::steady_clock::now());
}

void check_same(const std::string& what, const std::string& fingerprint) {
  if (!active()) return;
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : fingerprint) h = (h ^ c) * 1099511628211ull;
  auto all = allgather_cat(torch::tensor({int64_t(h)}, torch::kLong), what);
  std::vector<int> differ;
  for (int r = 1; r < world(); ++r)
    if (all[r].item<int64_t>() != all[0].item<int64_t>()) differ.push_back(r);
  if (differ.empty()) return;
  // Every rank's text to every rank (all of them take this branch), to show the first line that differs.
  std::vector<std::string> texts;
  {
    auto bytes =
        torch::from_blob(const_cast<char*>(fingerprint.data()), {int64_t(fingerprint.size())}, torch::kUInt8)
            .clone();
    auto sizes = allgather_cat(torch::tensor({int64_t(fingerprint.size())}, torch::kLong), what);
    auto joined = allgather_cat(bytes, what).contiguous();
    int64_t off = 0;
    for (int r = 0; r < world(); ++r) {
      const int64_t n = sizes[r].item<int64_t>();
      texts.emplace_back(reinterpret_cast<const char*>(joined.data_ptr<uint8_t>()) + off, size_t(n));
      off += n;
    }
  }
  auto first_difference = [](const std::string& a, const std::string& b) {
    std::istringstream x(a), y(b);
    std::string la, lb, section;  // the TOML section of the lines read, so a key is named in full
    while (true) {
      const bool ga = bool(std::getline(x, la)), gb = bool(std::getline(y, lb));
      if (!ga && !gb) return std::string();
      if (!ga || !gb || la != lb)
        return "'" + (gb ? section + lb : std::string("(end)")) + "' where rank 0 has '" +
               (ga ? section + la : std::string("(end)")) + "'";
      if (la.size() > 2 && la.front() == '[' && la.back() == ']') section = la.substr(1, la.size() - 2) + ".";
    }
  };
  std::ostringstream os;
  os << "distributed: " << what << " of ";
  for (size_t i = 0; i < differ.size(); ++i) os << (i ? ", " : "") << "rank " << differ[i];
  os << " differs from rank 0's";
  for (int r : differ) {
    const auto d = first_difference(texts[0], texts[size_t(r)]);
    if (!d.empty() && d.size() < 400) os << "; rank " << r << " has " << d;
  }
  os << ": every rank must be started with the same command line (--config, --set, --resume) on the same "
        "data";
  throw DistError(os.str());
}

CommStats comm_stats() {
  return state().comm;
}

GlobalBatchScope::GlobalBatchScope() : prev_(t_global_batch) {
  t_global_batch = true;
}
GlobalBatchScope::~GlobalBatchScope() {
  t_global_batch = prev_;
}
bool global_batch() {
  return t_global_batch && active();
}

}  // namespace moeforge::dist
