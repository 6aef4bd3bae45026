// Running past one process (docs/distributed.md): the process group every rank of a distributed run
// joins, made from the environment the launcher sets, over LibTorch's own c10d engine (ProcessGroupGloo,
// rendezvous on a c10d TCPStore or FileStore). No transport of our own.
//
// A process is single when neither launcher's variables are set; every helper below is then a no-op, so
// the code that calls them does not branch on the world size.
//
// Legend: W ranks (world size), r this rank.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace moeforge::dist {

// A collective that failed (a rank died, hung past the timeout, or disagreed at start). The message names
// the rank to blame when it can be told (docs/distributed.md, "Failure").
class DistError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Where this process sits, as read from the environment (docs/distributed.md, "Launching").
struct LaunchEnv {
  int rank = 0;
  int world = 1;
  int local_rank = 0;
  std::string launcher = "single";  // "single", "mpirun" (OMPI_COMM_WORLD_*), "env" (RANK, WORLD_SIZE)
  // Rendezvous: a c10d TCPStore at master_addr:master_port (rank 0 hosts it), or, when store_file is set
  // (MOEFORGE_DIST_STORE_FILE), a c10d FileStore at that path (one host, or a shared filesystem).
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string store_file;
  // How long a collective waits for the other ranks before it fails (MOEFORGE_DIST_TIMEOUT_S).
  std::chrono::milliseconds timeout{std::chrono::seconds(300)};
  // The gradient all-reduce (sync.h, GradientReducer): bucket size (MOEFORGE_DIST_BUCKET_KB) and whether
  // buckets start during backward (MOEFORGE_DIST_OVERLAP=0 turns that off; the result is the same bits).
  int64_t bucket_bytes = int64_t(1) << 20;
  bool overlap = true;
};

// Reads OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK (mpirun) or RANK / WORLD_SIZE / LOCAL_RANK (torchrun
// style), MASTER_ADDR, MASTER_PORT, MOEFORGE_DIST_STORE_FILE and MOEFORGE_DIST_TIMEOUT_S. A malformed or
// inconsistent value throws DistError naming the variable.
LaunchEnv launch_env_from_environment();

// The process-wide group. init() joins it (blocks until all W ranks have arrived, at most the timeout);
// a second init() is an error. Until init(), or after init() of a single process, active() is false.
void init(const LaunchEnv& env);
bool active();  // W > 1 and initialised
int rank();     // 0 when not active
int world();    // 1 when not active
const LaunchEnv& env();
// Leaves the group (stops the heartbeat); the destructor of the process does it too.
void shutdown();

// Expert parallelism's groups (docs/distributed.md, "Expert parallelism"). With dist.expert_parallel = G
// dividing W, the world is cut into W/G expert groups of G consecutive ranks (ranks [g*G, (g+1)*G)), the
// experts of every MoE layer sharded over the members of each; the ranks at the same place in their
// groups hold the same shard and form a replica group of W/G ranks, over which the shards' gradients are
// averaged. kWorld is every rank.
enum class Group { kWorld, kExperts, kReplicas };
// Builds both groups as c10d Gloo process groups of their own (when 1 < G < W; G = W needs none, the
// expert group is the world). A collective over the world: every rank calls it with the same G, after
// init(). Until it is called the expert group is the world. A G that does not divide W is a DistError.
void init_expert_groups(int expert_parallel);
// Whether init_expert_groups made expert groups of more than one rank: an MoE layer built now holds only
// its rank's shard of the experts (docs/distributed.md). False in one process and after shutdown().
bool experts_sharded();
int group_rank(Group g);  // this rank's place in its group of kind g (0 when not active)
int group_size(Group g);  // how many ranks that group has (1 when not active)

// Collectives; every rank of `group` must call the same ones in the same order with tensors of the same
// shapes (CPU). `what` names the call site in the error a failure gives. In a group of one rank they do
// nothing (all-gather and all-to-all return their input).
void allreduce_sum(std::vector<torch::Tensor>& tensors, const std::string& what,
                   Group group = Group::kWorld);                                         // in place
void broadcast(std::vector<torch::Tensor>& tensors, int root, const std::string& what);  // in place
// Concatenation along dim 0 of every rank's `t` in rank order; dim 0 may differ between ranks, the other
// dims may not.
torch::Tensor allgather_cat(const torch::Tensor& t, const std::string& what, Group group = Group::kWorld);
void barrier(const std::string& what);
// An all-reduce (sum, in place) that runs while this thread goes on, on the gradients' own process group:
// a second c10d Gloo group over the same rendezvous, whose calls form a sequence of their own, so that it
// may be in flight while the main group's collectives run (expert parallelism's all-to-alls during
// backward). Every rank must start the same ones in the same order. `t` must stay alive, and untouched,
// until wait_grad_allreduce(handle) has returned. Group::kReplicas: over the replica group, which carries
// nothing else either; kExperts is not offered.
int64_t start_grad_allreduce(torch::Tensor& t, const std::string& what, Group group = Group::kWorld);
void wait_grad_allreduce(int64_t handle);
// c10d's all-to-all with split sizes (alltoall_base): rows [sum send_rows, ...] go out, rows
// send_rows[0] first to rank 0 and so on; returns [sum recv_rows, ...] with recv_rows[s] rows from rank s,
// in rank order (ranks of `group`). No autograd (expert_parallel.h wraps it). In one process: `x` itself.
torch::Tensor all_to_all_rows(const torch::Tensor& x, const std::vector<int64_t>& send_rows,
                              const std::vector<int64_t>& recv_rows, const std::string& what,
                              Group group = Group::kWorld);
// Every rank passes its own `fingerprint` of something that must agree (the resolved configuration, the
// tokenizer, the data); a rank whose value differs from rank 0's is a DistError naming it and `what`.
void check_same(const std::string& what, const std::string& fingerprint);

// What this process's collectives moved since init: payload bytes it sent into all-reduces, broadcasts
// and all-gathers, their count and the wall time spent waiting on them (compute of other ranks included:
// a rank that arrives first waits for the last one).
struct CommStats {
  int64_t calls = 0;
  int64_t bytes = 0;
  double seconds = 0;
  // The all-to-alls of expert parallelism alone (included in the totals above).
  int64_t a2a_calls = 0;
  int64_t a2a_bytes = 0;
  double a2a_seconds = 0;
};
CommStats comm_stats();

// While one is alive in this thread, the forwards of the trainer's training steps compute the statistics
// that must be global (the balance loss's expert shares) over the global batch: the routers' losses call
// global_batch() (docs/distributed.md, "What is global").
class GlobalBatchScope {
 public:
  GlobalBatchScope();
  ~GlobalBatchScope();
  GlobalBatchScope(const GlobalBatchScope&) = delete;
  GlobalBatchScope& operator=(const GlobalBatchScope&) = delete;

 private:
  bool prev_;
};
bool global_batch();  // active() and inside a GlobalBatchScope

}  // namespace moeforge::dist
