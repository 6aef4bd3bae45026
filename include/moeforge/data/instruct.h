// Multi-task instruction data (data.corpus = "instruct", docs/instruct-data.md): samples of prompt +
// response generated reproducibly from resources installed on the machine, the Brown corpus's tagged
// sentences and genres, WordNet 3.0 (Debian's wordnet-base) and algorithmic text tasks, with whole tasks
// held out of training.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moeforge/data/corpus.h"
#include "moeforge/data/data_config.h"

namespace moeforge {

struct InstructTask {
  std::string name;         // data.instruct_tasks names it
  std::string family;       // tasks of one family share their kind of input and answer
  std::string source;       // "brown", "wordnet" or "generated"
  std::string description;  // one line, for the data card
};

// Every task the generator knows, in the data card's order.
const std::vector<InstructTask>& instruct_tasks();

struct InstructSample {
  std::string task;
  std::string prompt;                // instruction and input, ending in "Answer:"
  std::string response;              // the reference answer; packing adds the end token </s> after it
  std::vector<std::string> answers;  // every accepted answer, the response first
  std::string key;  // the task's input without the instruction's wording: samples of a task differ in it
};

struct InstructData {
  std::vector<std::string> tasks;    // data.instruct_tasks, in the order given
  std::vector<std::string> heldout;  // data.instruct_heldout
  // train and validation hold the trained tasks only; test holds the trained tasks' test samples and
  // every sample of the held-out tasks. Within a task, no key is in two splits.
  std::vector<InstructSample> train, validation, test;
};

// Checks data.instruct_tasks and data.instruct_heldout: an empty task list, an unknown task, a held-out
// task that is not in the list, or holding out every task -> ConfigError naming the key.
void check_instruct_tasks(const DataConfig& cfg);

// Generates the splits: per task, its pool of distinct inputs is drawn in a seeded order (from data.seed
// and the task's name, so adding a task does not change the others), the first instruct_eval_per_task go
// to test, the next to validation (trained tasks only), the next instruct_train_per_task to train.
// Reads <cfg.dir>/brown and, when a WordNet task is asked for, cfg.wordnet_dir; a missing folder or file
// -> FileError naming it. A task with fewer distinct inputs than asked for -> ConfigError naming
// data.instruct_train_per_task and the task.
InstructData generate_instruct(const DataConfig& cfg);

// The samples as documents (id "<split>/<task>/<index>", domain = task, text = prompt + " " + response),
// for the tokenizer and the logs: train, validation, and as `heldout` the test samples of held-out tasks.
// domains = the tasks, sorted. tokenizer_extra = the Brown documents' text, so that the tokenizer knows
// the corpus as well as the instructions.
CorpusSplit instruct_corpus_split(const InstructData& data, const DataConfig& cfg);

}  // namespace moeforge
