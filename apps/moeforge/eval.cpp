// moeforge eval: a checkpoint's perplexity and routing measures on a split, and for instruction data its
// task scores (docs/instruct.md).
#include <iostream>

#include "cli_util.h"
#include "command.h"
#include "moeforge/data/prepare.h"
#include "moeforge/experiments/instruct_eval.h"
#include "moeforge/model/trace.h"
#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"

namespace moeforge::cli {

namespace {

struct EvalArgs {
  std::string checkpoint, split = "validation", json, trace;
  std::string dtype = "fp32";
  int64_t batches = 0;
  InstructEvalOptions instruct;
};

int run_eval(EvalArgs& a) {
  auto lm = load_model(a.checkpoint);
  apply_dtype(lm, a.dtype);
  const std::string tok = lm.tokenizer->serialized();
  DataBundle data = prepare_data(lm.cfg.data, &tok, std::cout);
  const PackedData& set = a.split == "heldout" ? data.heldout : data.validation;
  if (set.size() == 0)
    throw ConfigError("data.heldout_genres", "this checkpoint's config has no held-out genres to evaluate");
  if (a.trace.empty()) {
    print_eval(evaluate(lm.model, set, lm.cfg.train.batch_size, a.batches, a.split));
  } else {
    // --trace: every token of the evaluated batches with its routing, from the evaluation's own forwards
    // (EvalObserver), each row with its document and domain (docs/serve.md, "Traces").
    RoutingTracer tracer(*lm.model, &*lm.tokenizer);
    int64_t rows = 0, tokens = 0;
    write_file_atomic(a.trace, [&](std::ostream& os) {
      auto header = trace_header(*lm.model, "eval " + a.split, set.domains);
      header["checkpoint"] = a.checkpoint;
      os << header.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
      auto observe = [&](const Batcher::Batch& batch, const torch::Tensor& inputs, const LMOutput& out) {
        const int64_t B = inputs.size(0);
        auto dom = batch.domain.to(torch::kCPU, torch::kLong).contiguous();
        torch::Tensor doc =
            batch.doc.defined() ? batch.doc.to(torch::kCPU, torch::kLong).contiguous() : torch::Tensor();
        std::vector<nlohmann::json> fields;
        for (int64_t b = 0; b < B; ++b) {
          const int64_t d = dom.data_ptr<int64_t>()[b];
          nlohmann::json f = {{"seq", rows + b}};
          if (doc.defined()) f["doc"] = doc.data_ptr<int64_t>()[b];
          if (d >= 0 && d < int64_t(set.domains.size())) f["domain"] = set.domains[d];
          fields.push_back(std::move(f));
        }
        for (const auto& r : tracer.step(inputs, 0, out, fields))
          os << r.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
        rows += B;
        tokens += inputs.numel();
      };
      print_eval(evaluate(lm.model, set, lm.cfg.train.batch_size, a.batches, a.split, observe));
    });
    std::cout << "routing trace of " << tokens << " tokens in " << rows << " sequences: " << a.trace << "\n";
  }
  if (data.instruct) {
    // Task scores: the validation samples (trained tasks), or with --split heldout the test samples, which
    // hold every trained task's test samples and the held-out tasks (docs/instruct-data.md).
    const auto& samples = a.split == "heldout" ? data.instruct->test : data.instruct->validation;
    a.instruct.batch_size = lm.cfg.train.batch_size;
    auto r = evaluate_instruct(lm.model, *lm.tokenizer, *data.instruct, samples, a.instruct);
    std::cout << "\n" << format_instruct_eval(r);
    if (!a.json.empty()) {
      write_file_atomic(a.json, r.to_json().dump(2) + "\n");
      std::cout << "task scores: " << a.json << "\n";
    }
  }
  return 0;
}

}  // namespace

Command add_eval(CLI::App& app, const Globals& /*g*/) {
  auto a = std::make_shared<EvalArgs>();
  auto* c = app.add_subcommand("eval", "evaluate a checkpoint: perplexity and routing measures");
  c->add_option("--checkpoint", a->checkpoint, "checkpoint folder")->required();
  add_dtype_option(c, a->dtype);
  c->add_option("--split", a->split, "validation or heldout")
      ->check(CLI::IsMember({"validation", "heldout"}));
  c->add_option("--batches", a->batches, "batches to evaluate (0 = the whole split)");
  c->add_option("--per-task", a->instruct.per_task,
                "instruction data: samples scored per task (0 = all; docs/instruct-data.md)")
      ->check(CLI::NonNegativeNumber);
  c->add_option("--max-new-tokens", a->instruct.max_new_tokens,
                "instruction data: greedy generation stops at </s> or after this many tokens")
      ->check(CLI::PositiveNumber);
  c->add_option("--mc-choices", a->instruct.mc_choices,
                "instruction data: candidates of the log-likelihood multiple choice, the reference and "
                "distractors from its task's other answers (0 = no multiple choice; docs/instruct.md)")
      ->check(CLI::Range(int64_t{0}, int64_t{64}));
  c->add_option("--json", a->json, "instruction data: write the task scores to this JSON file");
  c->add_option("--trace", a->trace,
                "write the routing of every evaluated token to this JSON-lines file (docs/serve.md; with "
                "--batches N for a few batches)");
  return {c, [a] { return run_eval(*a); }};
}

}  // namespace moeforge::cli
