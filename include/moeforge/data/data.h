// The data side of the trainer: corpus -> split -> tokenizer -> packed sequences -> batches.
#pragma once

#include "moeforge/data/batching.h"
#include "moeforge/data/corpus.h"
#include "moeforge/data/data_config.h"
#include "moeforge/data/tfidf.h"
#include "moeforge/data/tokenizer.h"
