// Helpers several subcommands share: number formatting, comma lists, the sample a checkpoint generates and
// the printed forms of an evaluation and of a router's state.
#pragma once

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

#include "moeforge/model/generate.h"
#include "moeforge/model/load.h"
#include "moeforge/train/evaluate.h"

namespace moeforge::cli {

std::vector<std::string> split_csv(const std::string& s);
std::string fixed(double v, int precision);

// `prompt` continued by the model of `lm` (the tokenizer's <s> first, </s> ends it unless ignore_eos): the
// prompt as given, then the continuation as the tokenizer decodes it after the prompt's tokens (so a word
// the model continues gets no inserted space). With `timing`, prints prefill and decode speed to stderr
// (docs/interop.md, "Decode speed"). `why`, when given, says why the generation ended; `hooks` watch the
// generation whose text is returned (a routing trace, docs/serve.md).
// `--dtype` of generate, eval and serve (model/inference_precision.h): "fp32" keeps the checkpoint's
// float32 weights, "bf16" stores the matrix weights in bf16, "auto" follows the checkpoint's
// train.precision. Says on stderr what runs. Throws ConfigError naming --dtype.
void apply_dtype(LoadedModel& lm, const std::string& dtype);
// Registers --dtype on a subcommand.
void add_dtype_option(CLI::App* c, std::string& dtype);

std::string sample_text(LoadedModel& lm, const std::string& prompt, const GenerateOptions& g,
                        bool ignore_eos = false, bool timing = false, GenerateStop* why = nullptr,
                        const GenerateHooks& hooks = {});

// An evaluation's loss, perplexity and routing measures per layer, the expert-choice routings and the
// cluster x domain table, on stdout.
void print_eval(const EvalResult& r);
// The cluster x domain table of routers that put tokens in clusters (nothing for the others).
void print_cluster_table(const EvalResult& r);
// A layer's router state (Router::describe_state), one key a line.
void print_router_state(const Router& router, size_t layer);

}  // namespace moeforge::cli
