// Task evaluation on instruction data: exact match of greedy generations, response perplexity and the
// routing tables by task (docs/instruct-data.md, "Evaluation").
#include "moeforge/experiments/instruct_eval.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <iomanip>
#include <map>
#include <sstream>

#include "moeforge/data/batching.h"
#include "moeforge/model/generate.h"
#include "moeforge/train/evaluate.h"

namespace moeforge {

std::string normalize_answer(const std::string& text) {
  std::string out;
  bool space = false;
  for (unsigned char c : text) {
    if (std::isspace(c)) {
      space = !out.empty();
      continue;
    }
    if (space) out.push_back(' ');
    space = false;
    out.push_back(char(std::tolower(c)));
  }
  auto punct = [](char c) { return c == '.' || c == ',' || c == ';' || c == ':' || c == '!' || c == '?'; };
  while (!out.empty() && (punct(out.back()) || out.back() == ' ')) out.pop_back();
  size_t start = 0;
  while (start < out.size() && (punct(out[start]) || out[start] == ' ')) ++start;
  return out.substr(start);
}

bool answer_matches(const std::string& generated, const std::vector<std::string>& answers) {
  const std::string g = normalize_answer(generated);
  return std::any_of(answers.begin(), answers.end(),
                     [&](const std::string& a) { return normalize_answer(a) == g; });
}

std::vector<std::string> mc_candidates(const InstructSample& x, const std::vector<std::string>& pool,
                                       int64_t choices, uint64_t salt, int64_t* reference) {
  std::vector<std::string> accepted;
  for (const auto& a : x.answers) accepted.push_back(normalize_answer(a));
  accepted.push_back(normalize_answer(x.response));
  std::vector<std::string> distractors;
  std::vector<std::string> seen;
  const size_t n = pool.size();
  for (size_t k = 0; k < n && int64_t(distractors.size()) + 1 < choices; ++k) {
    const auto& cand = pool[(salt + k) % n];
    const auto norm = normalize_answer(cand);
    if (std::find(accepted.begin(), accepted.end(), norm) != accepted.end()) continue;
    if (std::find(seen.begin(), seen.end(), norm) != seen.end()) continue;
    seen.push_back(norm);
    distractors.push_back(cand);
  }
  const int64_t size = int64_t(distractors.size()) + 1;
  *reference = int64_t(salt % uint64_t(size));
  std::vector<std::string> out = distractors;
  out.insert(out.begin() + *reference, x.response);
  return out;
}

namespace {

std::string family_of(const std::string& task) {
  for (const auto& t : instruct_tasks())
    if (t.name == task) return t.family;
  return "";
}

// The teacher-forced pass over one task's samples (one sample per row): response-token loss, and the
// first MoE layer's experts and clusters at the positions that predict a response token.
void teacher_forced(TransformerLM& model, const Tokenizer& tok, const std::vector<InstructSample>& samples,
                    int64_t batch_size, InstructTaskScore& s) {
  const int64_t S = model->model_config().max_seq_len;
  PackedData packed = pack_samples(samples, tok, S, {s.task}, /*pack=*/false);
  const int64_t rows = packed.size();
  s.too_long = packed.dropped;
  const auto& moe = model->moe_config();
  s.expert.assign(size_t(moe.routed_experts()), 0);
  for (int64_t r0 = 0; r0 < rows; r0 += batch_size) {
    const int64_t B = std::min(batch_size, rows - r0);
    auto tokens = packed.row_range(r0, B).tokens;
    auto weight = packed.weight.narrow(0, r0, B).reshape(-1).contiguous();  // [B*S]
    RouteContext ctx;
    ctx.prompt_len = packed.prompt_len.narrow(0, r0, B);  // a router may pool the prompt
    auto out = model->forward(tokens.narrow(1, 0, S), ctx);
    auto ce = torch::nn::functional::cross_entropy(
        out.logits.reshape({B * S, -1}), tokens.narrow(1, 1, S).reshape(-1),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));  // [B*S]
    auto row_loss =
        (ce.to(torch::kCPU, torch::kDouble) * weight.to(torch::kDouble)).view({B, S}).sum(1);  // [B]
    auto row_tokens = weight.to(torch::kDouble).view({B, S}).sum(1);                           // [B]
    s.loss_sum += row_loss.sum().item<double>();
    s.tokens += int64_t(std::llround(row_tokens.sum().item<double>()));
    // One sample per row (pack = false): the row's first sample is its sample.
    for (int64_t b = 0; b < B; ++b)
      if (row_tokens[b].item<double>() > 0)
        s.sample_loss.push_back(
            {packed.doc[r0 + b].item<int64_t>(), row_loss[b].item<double>() / row_tokens[b].item<double>()});
    if (out.plans.empty()) continue;
    const float* w = weight.data_ptr<float>();
    const auto& plan = out.plans[0];
    auto idx = plan.token_index.to(torch::kCPU, torch::kLong).contiguous();
    auto off = plan.expert_offsets.to(torch::kCPU, torch::kLong).contiguous();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const int64_t* op = off.data_ptr<int64_t>();
    const int64_t E = off.numel() - 1;
    if (int64_t(s.expert.size()) < E) s.expert.resize(size_t(E), 0);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = op[e]; i < op[e + 1]; ++i)
        if (ip[i] >= 0 && ip[i] < B * S && w[ip[i]] > 0) ++s.expert[size_t(e)];
    const auto clusters = model->moe_layers().front()->router->token_clusters(plan);
    if (clusters.defined()) {
      if (s.cluster.empty()) s.cluster.assign(size_t(moe.n_cluster), 0);
      auto c = clusters.to(torch::kCPU, torch::kLong).contiguous();
      const int64_t* cp = c.data_ptr<int64_t>();
      for (int64_t t = 0; t < std::min<int64_t>(c.numel(), B * S); ++t)
        if (w[t] > 0 && cp[t] >= 0 && cp[t] < int64_t(s.cluster.size())) ++s.cluster[size_t(cp[t])];
    }
  }
}

// Log-likelihood multiple choice over one task's samples: every candidate answer teacher-forced after the
// sample's prompt (one row each, the loss weights on the answer and its </s>), the summed log-likelihood of
// the answer compared across the sample's candidates.
void multiple_choice(TransformerLM& model, const Tokenizer& tok, const std::vector<InstructSample>& samples,
                     int64_t choices, int64_t batch_size, InstructTaskScore& s) {
  if (choices < 2) return;
  const int64_t S = model->model_config().max_seq_len;
  std::vector<std::string> pool;
  for (const auto& x : samples)
    if (std::find(pool.begin(), pool.end(), x.response) == pool.end()) pool.push_back(x.response);
  struct Pending {
    int64_t sample, reference, n;
  };
  std::vector<Pending> pending;
  std::vector<torch::Tensor> rows, weights, prompts;
  int64_t queued = 0;
  auto flush = [&] {
    if (queued == 0) return;
    auto tokens = torch::cat(rows, 0), weight = torch::cat(weights, 0);  // [R, S+1], [R, S]
    RouteContext ctx;
    ctx.prompt_len = torch::cat(prompts, 0);
    auto out = model->forward(tokens.narrow(1, 0, S), ctx);
    auto ce = torch::nn::functional::cross_entropy(
        out.logits.reshape({queued * S, -1}), tokens.narrow(1, 1, S).reshape(-1),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));  // [R*S]
    auto ll =
        -(ce.to(torch::kCPU, torch::kDouble).view({queued, S}) * weight.to(torch::kDouble)).sum(1);  // [R]
    const double* pl = ll.data_ptr<double>();
    int64_t r = 0;
    for (const auto& p : pending) {
      int64_t best = 0;
      for (int64_t c = 1; c < p.n; ++c)
        if (pl[r + c] > pl[r + best]) best = c;
      ++s.mc_samples;
      s.mc_correct += best == p.reference;
      s.mc_chance_sum += 1.0 / double(p.n);
      r += p.n;
    }
    pending.clear();
    rows.clear();
    weights.clear();
    prompts.clear();
    queued = 0;
  };
  for (size_t i = 0; i < samples.size(); ++i) {
    int64_t reference = 0;
    const auto cands = mc_candidates(samples[i], pool, choices, uint64_t(i) * 7919u + 1u, &reference);
    if (cands.size() < 2) continue;  // a task with one distinct answer has nothing to choose between
    std::vector<InstructSample> alt(cands.size(), samples[i]);
    for (size_t c = 0; c < cands.size(); ++c) alt[c].response = cands[c];
    PackedData p = pack_samples(alt, tok, S, {s.task}, /*pack=*/false);
    if (p.dropped > 0) continue;  // a candidate does not fit the context: the sample is not scored
    const int64_t n = p.size();
    rows.push_back(p.row_range(0, n).tokens);
    weights.push_back(p.weight);
    prompts.push_back(p.prompt_len);
    pending.push_back({int64_t(i), reference, n});
    queued += n;
    if (queued >= batch_size) flush();
  }
  flush();
}

double mean_of(const std::vector<double>& v) {
  double sum = 0;
  for (double x : v) sum += x;
  return v.empty() ? 0.0 : sum / double(v.size());
}

}  // namespace

InstructEvalResult evaluate_instruct(TransformerLM& model, const Tokenizer& tok, const InstructData& data,
                                     const std::vector<InstructSample>& samples,
                                     const InstructEvalOptions& opt) {
  torch::NoGradGuard ng;
  const bool was_training = model->is_training();
  model->eval();
  InstructEvalResult r;
  const int64_t context = model->model_config().max_seq_len;
  for (const auto& task : data.tasks) {
    InstructTaskScore s;
    s.task = task;
    s.family = family_of(task);
    s.heldout = std::count(data.heldout.begin(), data.heldout.end(), task) > 0;
    std::vector<InstructSample> mine;
    for (const auto& x : samples)
      if (x.task == task && (opt.per_task <= 0 || int64_t(mine.size()) < opt.per_task)) mine.push_back(x);
    if (mine.empty()) continue;
    for (const auto& x : mine) {
      std::vector<int64_t> prompt = {tok.bos_id()};
      const auto p = tok.encode(x.prompt);
      prompt.insert(prompt.end(), p.begin(), p.end());
      std::string generated;
      if (int64_t(prompt.size()) < context) {  // a prompt that fills the context has no room for an answer
        GenerateOptions g;
        g.max_tokens = opt.max_new_tokens;
        g.temperature = 0;  // greedy
        g.eos_id = tok.eos_id();
        auto ids = generate(model, prompt, g);
        if (!ids.empty() && ids.back() == tok.eos_id()) ids.pop_back();
        generated = tok.decode(ids);
      }
      const bool ok = answer_matches(generated, x.answers);
      ++s.samples;
      s.exact += ok;
      if (int64_t(s.examples.size()) < opt.examples)
        s.examples.push_back({x.prompt, generated, x.response, ok});
    }
    teacher_forced(model, tok, mine, std::max<int64_t>(1, opt.batch_size), s);
    multiple_choice(model, tok, mine, opt.mc_choices, std::max<int64_t>(1, opt.batch_size), s);
    r.tasks.push_back(std::move(s));
  }
  std::vector<double> acc_in, acc_out, loss_in, loss_out, mc_in, mc_out, ch_in, ch_out;
  std::map<std::string, std::vector<int64_t>> by_family;
  std::vector<std::vector<int64_t>> by_task;
  for (const auto& s : r.tasks) {
    (s.heldout ? acc_out : acc_in).push_back(s.accuracy());
    (s.heldout ? loss_out : loss_in).push_back(s.loss());
    if (s.mc_samples > 0) {
      (s.heldout ? mc_out : mc_in).push_back(s.mc_accuracy());
      (s.heldout ? ch_out : ch_in).push_back(s.mc_chance());
    }
    if (s.cluster.empty()) continue;
    by_task.push_back(s.cluster);
    auto& f = by_family[s.family];
    if (f.empty()) f.assign(s.cluster.size(), 0);
    for (size_t c = 0; c < s.cluster.size(); ++c) f[c] += s.cluster[c];
  }
  r.heldin_accuracy = mean_of(acc_in);
  r.heldout_accuracy = mean_of(acc_out);
  r.heldin_loss = mean_of(loss_in);
  r.heldout_loss = mean_of(loss_out);
  r.heldin_mc = mean_of(mc_in);
  r.heldout_mc = mean_of(mc_out);
  r.heldin_mc_chance = mean_of(ch_in);
  r.heldout_mc_chance = mean_of(ch_out);
  // Purity of the clusters by label: sum over clusters of the largest label count, over all counts (the
  // table is [label][cluster] here, so transpose into table_purity's [cluster][label]).
  auto purity = [](const std::vector<std::vector<int64_t>>& label_cluster) {
    if (label_cluster.empty()) return 0.0;
    std::vector<std::vector<int64_t>> t(label_cluster[0].size(), std::vector<int64_t>(label_cluster.size()));
    for (size_t l = 0; l < label_cluster.size(); ++l)
      for (size_t c = 0; c < label_cluster[l].size() && c < t.size(); ++c) t[c][l] = label_cluster[l][c];
    return table_purity(t);
  };
  r.cluster_purity_task = purity(by_task);
  std::vector<std::vector<int64_t>> fam;
  for (auto& [name, counts] : by_family) fam.push_back(counts);
  r.cluster_purity_family = purity(fam);
  if (was_training) model->train();
  return r;
}

nlohmann::json InstructEvalResult::to_json() const {
  nlohmann::json j;
  j["heldin_accuracy"] = heldin_accuracy;
  j["heldout_accuracy"] = heldout_accuracy;
  j["heldin_loss"] = heldin_loss;
  j["heldout_loss"] = heldout_loss;
  j["heldin_mc"] = heldin_mc;
  j["heldout_mc"] = heldout_mc;
  j["heldin_mc_chance"] = heldin_mc_chance;
  j["heldout_mc_chance"] = heldout_mc_chance;
  j["cluster_purity_task"] = cluster_purity_task;
  j["cluster_purity_family"] = cluster_purity_family;
  j["tasks"] = nlohmann::json::array();
  for (const auto& s : tasks) {
    nlohmann::json t = {{"task", s.task},
                        {"family", s.family},
                        {"heldout", s.heldout},
                        {"samples", s.samples},
                        {"exact", s.exact},
                        {"accuracy", s.accuracy()},
                        {"loss", s.loss()},
                        {"perplexity", std::exp(s.loss())},
                        {"tokens", s.tokens},
                        {"too_long", s.too_long},
                        {"expert", s.expert},
                        {"cluster", s.cluster},
                        {"mc_samples", s.mc_samples},
                        {"mc_correct", s.mc_correct},
                        {"mc_accuracy", s.mc_accuracy()},
                        {"mc_chance", s.mc_chance()},
                        {"sample_loss", s.sample_loss}};
    t["examples"] = nlohmann::json::array();
    for (const auto& e : s.examples)
      t["examples"].push_back({{"prompt", e.prompt},
                               {"generated", e.generated},
                               {"reference", e.reference},
                               {"correct", e.correct}});
    j["tasks"].push_back(std::move(t));
  }
  return j;
}

std::string format_instruct_eval(const InstructEvalResult& r) {
  std::ostringstream o;
  o << std::fixed;
  o << "task                 family        split     samples  exact match  response ppl  multiple choice "
       "(chance)\n";
  for (const auto& s : r.tasks)
    o << std::left << std::setw(21) << s.task << std::setw(14) << s.family << std::setw(10)
      << (s.heldout ? "held-out" : "held-in") << std::right << std::setw(7) << s.samples << std::setw(12)
      << std::setprecision(3) << s.accuracy() << std::setw(14) << std::setprecision(2) << std::exp(s.loss())
      << std::setw(10) << std::setprecision(3) << s.mc_accuracy() << " (" << s.mc_chance() << ")\n";
  o << std::setprecision(3) << "held-in accuracy " << r.heldin_accuracy << " (ppl " << std::setprecision(2)
    << std::exp(r.heldin_loss) << "), held-out accuracy " << std::setprecision(3) << r.heldout_accuracy
    << " (ppl " << std::setprecision(2) << std::exp(r.heldout_loss) << "); task averages\n";
  o << "multiple choice: held-in " << r.heldin_mc << " (chance " << r.heldin_mc_chance << "), held-out "
    << r.heldout_mc << " (chance " << r.heldout_mc_chance << "); task averages\n";
  bool clusters =
      std::any_of(r.tasks.begin(), r.tasks.end(), [](const auto& s) { return !s.cluster.empty(); });
  if (clusters) {
    o << "task x cluster (response positions of the first MoE layer; purity by task " << std::setprecision(3)
      << r.cluster_purity_task << ", by family " << r.cluster_purity_family << "):\n";
    for (const auto& s : r.tasks) {
      o << "  " << std::left << std::setw(21) << s.task << std::right;
      for (auto n : s.cluster) o << std::setw(8) << n;
      o << "\n";
    }
  }
  if (std::any_of(r.tasks.begin(), r.tasks.end(), [](const auto& s) { return s.expert.size() > 1; })) {
    o << "task x expert (response positions of the first MoE layer, assignments):\n";
    for (const auto& s : r.tasks) {
      o << "  " << std::left << std::setw(21) << s.task << std::right;
      for (auto n : s.expert) o << std::setw(6) << n;
      o << "\n";
    }
  }
  return o.str();
}

}  // namespace moeforge
