// C interface of the SentencePiece shim module (libmoeforge_spm.so), loaded by src/data/tokenizer.cpp.
//
// Why a separate module: Debian's libsentencepiece embeds its own, older protobuf-lite and exports its
// symbols. Linked into a process that also loads LibTorch's libprotobuf.so.32, either copy interposes on
// the other: the process crashes in libprotobuf's static initialisers, or SentencePiece fails its own
// protobuf CHECKs. The tokenizer therefore dlopen()s this module with RTLD_LOCAL | RTLD_DEEPBIND, which
// keeps SentencePiece and its protobuf in a private symbol scope. Plain C types only cross the boundary.
#pragma once

#include <stddef.h>
#include <stdint.h>

extern "C" {

// Every function returns 0 on success; on failure it returns non-zero and sets *error to a message the
// caller frees with moeforge_spm_free. Buffers returned through out-parameters are freed the same way.
int moeforge_spm_train(const char* const* texts, const size_t* lengths, size_t n_texts, int64_t vocab_size,
                       uint64_t seed, int n_threads, int byte_fallback, char** proto, size_t* proto_len,
                       char** error);
int moeforge_spm_load(const char* proto, size_t proto_len, void** model, char** error);
void moeforge_spm_release(void* model);
int moeforge_spm_encode(const void* model, const char* text, size_t text_len, int32_t** ids, size_t* n_ids,
                        char** error);
int moeforge_spm_decode(const void* model, const int32_t* ids, size_t n_ids, char** text, size_t* text_len,
                        char** error);
int moeforge_spm_serialize(const void* model, char** proto, size_t* proto_len, char** error);
// vocabulary size, <s> id, </s> id
void moeforge_spm_info(const void* model, int64_t* vocab_size, int64_t* bos_id, int64_t* eos_id);
void moeforge_spm_free(void* buffer);

}  // extern "C"
