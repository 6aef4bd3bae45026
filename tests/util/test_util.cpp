#include "test_util.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

namespace moeforge::test {

::testing::AssertionResult tensors_close(const torch::Tensor& actual, const torch::Tensor& expected,
                                         double atol, double rtol) {
  if (!actual.defined() || !expected.defined()) return ::testing::AssertionFailure() << "undefined tensor";
  if (actual.sizes() != expected.sizes())
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << " vs expected " << expected.sizes();
  auto a = actual.detach().to(torch::kCPU, torch::kDouble).reshape(-1);
  auto b = expected.detach().to(torch::kCPU, torch::kDouble).reshape(-1);
  auto diff = (a - b).abs();
  auto bad = diff > (atol + rtol * b.abs());
  bad = bad | a.isnan() != b.isnan();
  const int64_t n_bad = bad.sum().item<int64_t>();
  if (n_bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  const double max_diff = a.numel() ? diff.max().item<double>() : 0.0;
  os << n_bad << " of " << a.numel() << " elements differ (atol " << atol << ", rtol " << rtol
     << "), max |diff| = " << max_diff << "; first:";
  auto idx = bad.nonzero().reshape(-1);
  for (int64_t i = 0; i < std::min<int64_t>(5, idx.numel()); ++i) {
    const int64_t j = idx[i].item<int64_t>();
    os << " [" << j << "] " << a[j].item<double>() << " vs " << b[j].item<double>() << ";";
  }
  return ::testing::AssertionFailure() << os.str();
}

SafeTensors load_golden(const std::string& name) {
  return read_safetensors(std::string(MOEFORGE_GOLDEN_DIR) + "/" + name + ".safetensors");
}

torch::Tensor numeric_grad(const std::function<torch::Tensor()>& f, torch::Tensor param, double eps) {
  torch::NoGradGuard ng;
  auto flat = param.view(-1);
  auto grad = torch::zeros_like(flat);
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const double orig = flat[i].item<double>();
    flat[i] = orig + eps;
    const double fp = f().item<double>();
    flat[i] = orig - eps;
    const double fm = f().item<double>();
    flat[i] = orig;
    grad[i] = (fp - fm) / (2 * eps);
  }
  return grad.view(param.sizes());
}

std::string shared_test_dir(const std::string& name,
                            const std::function<void(const std::filesystem::path&)>& write) {
  namespace fs = std::filesystem;
  const fs::path root = fs::path(::testing::TempDir()) / name;
  if (fs::exists(root)) return root.string();
  const fs::path tmp = root.string() + ".tmp" + std::to_string(::getpid());
  fs::remove_all(tmp);
  write(tmp);
  std::error_code ec;
  fs::rename(tmp, root, ec);  // fails when another process got there first: its folder is the same
  if (ec) fs::remove_all(tmp);
  return root.string();
}

std::string tiny_text_corpus() {
  namespace fs = std::filesystem;
  static const std::string dir = shared_test_dir("moeforge_tiny_corpus_v2", [](const fs::path& root) {
    const char* animals[] = {"cat", "dog", "bird", "fox", "horse", "mouse"};
    const char* verbs[] = {"sees", "chases", "likes", "follows"};
    const char* tools[] = {"hammer", "saw", "drill", "wrench", "chisel"};
    const char* acts[] = {"cuts", "holds", "turns", "breaks"};
    for (int f = 0; f < 6; ++f) {
      for (const std::string domain : {"animals", "tools"}) {
        fs::create_directories(root / domain);
        std::ofstream out(root / domain / ("doc" + std::to_string(f) + ".txt"));
        const bool a = domain == "animals";
        for (int i = 0; i < 60; ++i)
          out << "the " << (a ? animals[(i + f) % 6] : tools[(i + f) % 5]) << " "
              << (a ? verbs[i % 4] : acts[i % 4]) << " the "
              << (a ? animals[(i * 7 + f) % 6] : tools[(i * 3 + f) % 5]) << ". ";
      }
    }
  });
  return dir;
}

std::vector<std::string> tiny_run_overrides(const std::string& name, const std::vector<std::string>& extra) {
  const auto data = std::filesystem::path(::testing::TempDir()) / ("moeforge_tiny_data_" + name);
  std::vector<std::string> o = {"model.d_model=32", "model.n_layer=2", "model.n_head=2", "model.d_ff=48",
                                "model.moe_every=1", "moe.n_expert=4", "moe.d_expert=24", "train.steps=40",
                                "train.batch_size=4", "train.lr=1e-2", "train.warmup=5", "train.eval_every=0",
                                "train.eval_batches=2", "train.log_every=5", "train.threads=1",
                                "data.corpus=\"text:" + tiny_text_corpus() + "\"",
                                "data.dir=\"" + data.string() + "\"", "data.vocab_size=128",
                                // No room for 256 byte pieces, whatever a config's default says.
                                "data.byte_fallback=false", "data.seq_len=16", "data.validation_fraction=0.2",
                                "data.heldout_genres=[]"};
  o.insert(o.end(), extra.begin(), extra.end());
  return o;
}

}  // namespace moeforge::test
