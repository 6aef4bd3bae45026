// Spherical k-means with k-means++ seeding on the cosine distance 1 - cos. See the header.
#include "moeforge/data/kmeans.h"

#include <random>
#include <vector>

namespace moeforge {

namespace {

torch::Tensor unit_rows(const torch::Tensor& v) {  // [M, D] -> rows of norm 1 (zero rows stay zero)
  return v / v.norm(2, {1}, true).clamp_min(1e-12);
}

// k-means++ (Arthur & Vassilvitskii 2007) on d = 1 - cos: each next seed is drawn with probability
// proportional to d^2 to its nearest seed so far.
torch::Tensor seed_plus_plus(const torch::Tensor& X, int64_t G, std::mt19937_64& rng) {
  const int64_t M = X.size(0);
  std::vector<int64_t> chosen{std::uniform_int_distribution<int64_t>(0, M - 1)(rng)};
  auto best = torch::full({M}, -2.0f);  // [M] best similarity to a seed so far
  while (int64_t(chosen.size()) < G) {
    best = torch::maximum(best, torch::matmul(X, X[chosen.back()]));          // [M]
    auto w = (1 - best).clamp_min(0).pow(2).to(torch::kDouble).contiguous();  // [M]
    std::vector<double> weights(w.data_ptr<double>(), w.data_ptr<double>() + M);
    double total = 0;
    for (double v : weights) total += v;
    if (total <= 0) weights.assign(M, 1.0);  // all points coincide with seeds: any point will do
    chosen.push_back(std::discrete_distribution<int64_t>(weights.begin(), weights.end())(rng));
  }
  return X.index_select(0, torch::tensor(chosen, torch::kLong)).clone();  // [G, D]
}

}  // namespace

torch::Tensor nearest_centroid(const torch::Tensor& x, const torch::Tensor& centroids) {
  torch::NoGradGuard ng;
  auto X = unit_rows(x.detach().to(torch::kCPU, torch::kFloat));
  auto Cn = unit_rows(centroids.detach().to(torch::kCPU, torch::kFloat));
  return torch::matmul(X, Cn.t()).argmax(1);  // [M]
}

KMeansResult spherical_kmeans(const torch::Tensor& x, int64_t G, const KMeansOptions& opt) {
  torch::NoGradGuard ng;
  TORCH_CHECK(x.dim() == 2, "spherical_kmeans: x must be [M, D]");
  const int64_t M = x.size(0);
  TORCH_CHECK(G >= 1 && G <= M, "spherical_kmeans: need 1 <= n_cluster <= M = ", M, ", got ", G);
  TORCH_CHECK(opt.n_iter >= 1 && opt.n_restart >= 1, "spherical_kmeans: n_iter and n_restart must be >= 1");
  auto X = unit_rows(x.detach().to(torch::kCPU, torch::kFloat)).contiguous();  // [M, D]

  KMeansResult best;
  best.mean_similarity = -2;
  for (int64_t r = 0; r < opt.n_restart; ++r) {
    std::mt19937_64 rng(opt.seed * 1000003ULL + uint64_t(r));
    auto Cn = seed_plus_plus(X, G, rng);  // [G, D]
    torch::Tensor assign;                 // [M]
    for (int64_t it = 0; it < opt.n_iter; ++it) {
      auto sims = torch::matmul(X, Cn.t());  // [M, G]
      auto next = sims.argmax(1);            // [M]
      const bool converged = assign.defined() && next.equal(assign);
      assign = next;
      if (converged) break;
      // Centroid = normalised sum of its members (the spherical k-means update, Dhillon & Modha 2001).
      auto sums = torch::zeros_like(Cn).index_add_(0, assign, X);               // [G, D]
      auto counts = torch::zeros({G}).index_add_(0, assign, torch::ones({M}));  // [G]
      auto own = sims.gather(1, assign.unsqueeze(1)).squeeze(1).clone();        // [M]
      for (int64_t g = 0; g < G; ++g) {
        if (counts[g].item<float>() > 0) {
          Cn[g] = unit_rows(sums[g].unsqueeze(0)).squeeze(0);
        } else {
          // Empty cluster: re-seed it with the vector worst served by its centroid.
          const int64_t far = own.argmin().item<int64_t>();
          Cn[g] = X[far];
          own[far] = 2;  // not chosen twice
        }
      }
    }
    auto sims = torch::matmul(X, Cn.t());
    auto final_assign = sims.argmax(1);
    const double score = std::get<0>(sims.max(1)).mean().item<double>();
    if (score > best.mean_similarity) {
      best.centroids = Cn;
      best.assignment = final_assign;
      best.mean_similarity = score;
    }
  }
  return best;
}

}  // namespace moeforge
