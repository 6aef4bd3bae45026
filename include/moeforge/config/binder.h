// Binds TOML keys ("section.key") to fields of config structs, so that files, --set overrides and error
// messages share one table of names. Unknown keys and values of the wrong type are errors naming the key.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace toml {
inline namespace v3 {
class node;
class table;
}  // namespace v3
}  // namespace toml

namespace moeforge {

class ConfigBinder {
 public:
  void bind(const std::string& key, int64_t* field);
  void bind(const std::string& key, double* field);
  void bind(const std::string& key, bool* field);
  void bind(const std::string& key, std::string* field);
  // A TOML array of strings; a single string is taken as a list of one (so --set k=word works).
  void bind(const std::string& key, std::vector<std::string>* field);
  template <class Enum>
  void bind_enum(const std::string& key, Enum* field, std::vector<std::pair<std::string, Enum>> names) {
    std::vector<std::string> allowed;
    for (auto& n : names) allowed.push_back(n.first);
    bind_choice(
        key, allowed,
        [field, names](const std::string& v) {
          for (auto& n : names)
            if (n.first == v) *field = n.second;
        },
        [field, names]() {
          for (auto& n : names)
            if (n.second == *field) return n.first;
          return std::string();
        });
  }

  // Applies every key of a parsed TOML document. `where` names the source (a file path) for errors.
  void apply(const toml::table& doc, const std::string& where) const;
  // Applies one "section.key=value" override; the value is read as TOML, or as a bare string.
  void apply_override(const std::string& assignment) const;
  // Reads a TOML file and applies it.
  void apply_file(const std::string& path) const;
  // Applies TOML text (an embedded default, say).
  void apply_text(const std::string& text, const std::string& where) const;

  bool has(const std::string& key) const { return setters_.count(key) != 0; }
  // The current values of every bound key as a TOML document, one [section] per prefix.
  std::string to_toml() const;
  std::vector<std::string> keys() const;

 private:
  using Setter = std::function<void(const toml::node&, const std::string& where)>;
  void bind_choice(const std::string& key, std::vector<std::string> allowed,
                   std::function<void(const std::string&)> set, std::function<std::string()> get);
  void set(const std::string& key, const toml::node& value, const std::string& where) const;
  std::map<std::string, Setter> setters_;
  std::map<std::string, std::function<std::string()>> dumpers_;  // key -> TOML literal of the value
};

}  // namespace moeforge
