// Everything derived from the [data] section: the split, the tokenizer (trained, cached, or a checkpoint's)
// and the packed splits that training and evaluation batch from.
#pragma once

#include <optional>
#include <ostream>
#include <string>

#include "moeforge/data/batching.h"
#include "moeforge/data/corpus.h"
#include "moeforge/data/data_config.h"
#include "moeforge/data/instruct.h"
#include "moeforge/data/tokenizer.h"

namespace moeforge {

struct DataBundle {
  CorpusSplit split;
  std::optional<InstructData> instruct;  // data.corpus = "instruct": the samples the splits were packed from
  std::optional<Tokenizer> tokenizer;
  PackedData train, validation, heldout;
};
// Reads the corpus of `cfg`, splits it, trains or loads the tokenizer (`tokenizer_model`: a serialised
// model to use, e.g. a checkpoint's; null: train one, cached under data.dir/cache) and packs the splits,
// saying what it did on `log`.
DataBundle prepare_data(const DataConfig& cfg, const std::string* tokenizer_model, std::ostream& log);

}  // namespace moeforge
