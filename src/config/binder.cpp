#include "moeforge/config/binder.h"
#include "moeforge/config/toml_file.h"

#include <toml++/toml.h>

#include <cmath>
#include <regex>
#include <sstream>

#include "moeforge/util/error.h"

namespace moeforge {
namespace {

std::string located(const std::string& where, const toml::node& node) {
  return toml_place(where, node);
}

std::string shown(const std::string& s) {
  return clipped(s);
}

std::string type_name(const toml::node& node) {
  std::ostringstream os;
  os << node.type();
  return os.str();
}

}  // namespace

void ConfigBinder::bind(const std::string& key, int64_t* field) {
  dumpers_[key] = [field] { return std::to_string(*field); };
  setters_[key] = [key, field](const toml::node& n, const std::string& where) {
    if (auto v = n.value_exact<int64_t>()) {
      *field = *v;
      return;
    }
    throw ConfigError(key, "expected an integer, got " + type_name(n) + " (" + located(where, n) + ")");
  };
}

void ConfigBinder::bind(const std::string& key, double* field) {
  dumpers_[key] = [field] {
    std::ostringstream os;
    os.precision(17);
    os << *field;
    std::string s = os.str();
    if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // keep it a TOML float
    return s;
  };
  setters_[key] = [key, field](const toml::node& n, const std::string& where) {
    // An integer beyond 2^53 has no exact double, and toml++'s value<double>() is then empty: convert it
    // ourselves (to the nearest double) rather than throw bad_optional_access (a fuzz finding,
    // docs/reliability.md).
    if (n.is_integer()) {
      *field = static_cast<double>(n.as_integer()->get());
      return;
    }
    if (n.is_floating_point()) {
      const double v = n.as_floating_point()->get();
      // inf and nan are TOML floats, and no key of moeforge's means anything by them (docs/reliability.md).
      if (!std::isfinite(v))
        throw ConfigError(key, "must be a finite number, got " + std::string(std::isnan(v) ? "nan" : "inf") +
                                   " (" + located(where, n) + ")");
      *field = v;
      return;
    }
    throw ConfigError(key, "expected a number, got " + type_name(n) + " (" + located(where, n) + ")");
  };
}

void ConfigBinder::bind(const std::string& key, bool* field) {
  dumpers_[key] = [field] { return std::string(*field ? "true" : "false"); };
  setters_[key] = [key, field](const toml::node& n, const std::string& where) {
    if (auto v = n.value_exact<bool>()) {
      *field = *v;
      return;
    }
    throw ConfigError(key, "expected true or false, got " + type_name(n) + " (" + located(where, n) + ")");
  };
}

void ConfigBinder::bind(const std::string& key, std::string* field) {
  dumpers_[key] = [field] {
    std::ostringstream os;
    os << toml::value<std::string>(*field);
    return os.str();
  };
  setters_[key] = [key, field](const toml::node& n, const std::string& where) {
    if (auto v = n.value_exact<std::string>()) {
      *field = *v;
      return;
    }
    throw ConfigError(key, "expected a string, got " + type_name(n) + " (" + located(where, n) + ")");
  };
}

void ConfigBinder::bind(const std::string& key, std::vector<std::string>* field) {
  dumpers_[key] = [field] {
    toml::array a;
    for (auto& v : *field) a.push_back(v);
    std::ostringstream os;
    os << a;
    return os.str();
  };
  setters_[key] = [key, field](const toml::node& n, const std::string& where) {
    if (auto v = n.value_exact<std::string>()) {
      *field = {*v};
      return;
    }
    const auto* array = n.as_array();
    if (!array)
      throw ConfigError(key,
                        "expected an array of strings, got " + type_name(n) + " (" + located(where, n) + ")");
    std::vector<std::string> values;
    for (size_t i = 0; i < array->size(); ++i) {
      const auto& item = *array->get(i);
      auto v = item.value_exact<std::string>();
      if (!v)
        throw ConfigError(key, "element " + std::to_string(i) + ": expected a string, got " +
                                   type_name(item) + " (" + located(where, item) + ")");
      values.push_back(*v);
    }
    *field = std::move(values);  // assigned only when every element is valid
  };
}

void ConfigBinder::bind_choice(const std::string& key, std::vector<std::string> allowed,
                               std::function<void(const std::string&)> set,
                               std::function<std::string()> get) {
  dumpers_[key] = [get] {
    std::ostringstream os;
    os << toml::value<std::string>(get());
    return os.str();
  };
  setters_[key] = [key, allowed, set](const toml::node& n, const std::string& where) {
    std::string all;
    for (auto& a : allowed) all += (all.empty() ? "" : ", ") + a;
    auto v = n.value_exact<std::string>();
    if (!v) throw ConfigError(key, "expected one of " + all + " (" + located(where, n) + ")");
    for (auto& a : allowed) {
      if (a == *v) {
        set(*v);
        return;
      }
    }
    throw ConfigError(
        key, "unknown value '" + shown(*v) + "', expected one of " + all + " (" + located(where, n) + ")");
  };
}

void ConfigBinder::set(const std::string& key, const toml::node& value, const std::string& where) const {
  auto it = setters_.find(key);
  if (it == setters_.end()) throw ConfigError(key, "unknown key (" + located(where, value) + ")");
  it->second(value, where);
}

void ConfigBinder::apply(const toml::table& doc, const std::string& where) const {
  for (auto&& [section, node] : doc) {
    const std::string sec(section.str());
    const auto* table = node.as_table();
    if (!table) throw ConfigError(sec, "expected a [" + sec + "] table (" + located(where, node) + ")");
    for (auto&& [key, value] : *table) set(sec + "." + std::string(key.str()), value, where);
  }
}

void ConfigBinder::apply_text(const std::string& text, const std::string& where) const {
  toml::table doc;
  try {
    doc = toml::parse(text, where);
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << where << ":" << e.source().begin.line << ":" << e.source().begin.column << ": " << e.description();
    throw ConfigError("(file)", os.str());
  }
  apply(doc, where);
}

void ConfigBinder::apply_file(const std::string& path) const {
  apply(read_toml_file(path), path);
}

void ConfigBinder::apply_override(const std::string& assignment) const {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw ConfigError(shown(assignment), "an override must look like section.key=value");
  const std::string key = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);
  const std::string where = "--set " + shown(assignment);
  if (!has(key)) throw ConfigError(shown(key), "unknown key (" + where + ")");
  toml::table doc;
  try {
    doc = toml::parse("v = " + value);
  } catch (const toml::parse_error&) {
    // A number TOML cannot hold is a number out of range, not a word.
    static const std::regex number(R"re([+-]?[0-9][0-9_]*(\.[0-9_]+)?([eE][+-]?[0-9]+)?)re");
    if (std::regex_match(value, number))
      throw ConfigError(key, "'" + shown(value) +
                                 "' is out of range (integers are 64-bit: -9223372036854775808 to "
                                 "9223372036854775807) (" +
                                 where + ")");
    doc = toml::table{};
    doc.insert("v", value);  // a bare word: take it as a string
  }
  set(key, *doc.get("v"), where);
}

std::string ConfigBinder::to_toml() const {
  std::ostringstream os;
  std::string section;
  for (auto& [key, dump] : dumpers_) {
    const auto dot = key.find('.');
    const std::string sec = key.substr(0, dot);
    if (sec != section) {
      os << (section.empty() ? "" : "\n") << "[" << sec << "]\n";
      section = sec;
    }
    os << key.substr(dot + 1) << " = " << dump() << "\n";
  }
  return os.str();
}

std::vector<std::string> ConfigBinder::keys() const {
  std::vector<std::string> out;
  for (auto& kv : setters_) out.push_back(kv.first);
  return out;
}

toml::table read_toml_file(const std::string& path) {
  try {
    return toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << e.description() << " at line " << e.source().begin.line << ", column " << e.source().begin.column;
    throw FileError(path, os.str());
  }
}

std::string toml_place(const std::string& where, const toml::node& node) {
  std::ostringstream os;
  os << where;
  const auto& src = node.source();
  if (src.begin.line > 0) os << ":" << src.begin.line << ":" << src.begin.column;
  return os.str();
}

}  // namespace moeforge
