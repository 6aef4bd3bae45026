// TOML files as the binder reads them, for the code that reads tables the binder does not bind (the
// comparison's [compare] section): the same parse errors and the same "path:line:column" places.
#pragma once

#include <toml++/toml.h>

#include <string>

namespace moeforge {

// The document of the TOML file `path`; a FileError naming it ("<what> at line L, column C") when it does
// not parse.
toml::table read_toml_file(const std::string& path);

// "where:line:column" of `node` (just `where` for a node without a source line, e.g. built in code).
std::string toml_place(const std::string& where, const toml::node& node);

}  // namespace moeforge
