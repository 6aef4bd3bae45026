// Where the SentencePiece module comes from. SentencePiece runs in a module of its own (moeforge_spm,
// loaded on first use; src/data/spm_shim/spm_shim.h says why), so a moved or installed binary must find it:
// docs/interop.md, "moeforge as a library".
#pragma once

#include <string>
#include <vector>

namespace moeforge {

// The places the module is looked for, in order: $MOEFORGE_SPM_SHIM; the module of the installed package a
// program was built against (moeforgeConfig.cmake compiles its path into the program); relative to the binary
// moeforge is linked into (an installed prefix's bin/ -> lib/moeforge/, also after the whole prefix was
// moved; or the same folder, as in the build tree); the install prefix the build was configured for (a user's
// program linked against the installed package); the build tree's copy.
std::vector<std::string> tokenizer_module_candidates();

// The module this process loaded (loading it now if needed). Throws naming every place tried when none
// loads.
std::string tokenizer_module_path();

}  // namespace moeforge
