// The page of a routing trace (trace_page.h; docs/serve.md, "The page").
#include "moeforge/experiments/trace_page.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iomanip>
#include <map>
#include <sstream>

#include "moeforge/routing/stats.h"
#include "moeforge/util/error.h"

namespace moeforge {

namespace {

using nlohmann::json;

std::string esc(const std::string& s) {
  std::string o;
  o.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&':
        o += "&amp;";
        break;
      case '<':
        o += "&lt;";
        break;
      case '>':
        o += "&gt;";
        break;
      case '"':
        o += "&quot;";
        break;
      case '\'':
        o += "&#39;";
        break;
      default:
        o += c;
    }
  }
  return o;
}

std::string num(double v, int p) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(p) << v;
  return os.str();
}

// A router field's value as the hover text shows it: numbers with 3 decimals, lists in brackets.
std::string field_text(const json& v) {
  if (v.is_number_float()) return num(v.get<double>(), 3);
  if (v.is_array()) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + field_text(v[i]);
    return s + "]";
  }
  return v.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string text_of(const json& r) {
  auto it = r.find("text");
  if (it != r.end() && it->is_string()) return it->get<std::string>();
  return "#" + std::to_string(r.value("id", int64_t(-1)));
}

// A checked field of a record, or FileError naming the line.
const json& need(const json& r, const char* key, const std::string& path, int64_t line) {
  auto it = r.find(key);
  if (it == r.end())
    throw FileError(path, "line " + std::to_string(line) + ": the record has no \"" + key + "\"");
  return *it;
}

}  // namespace

std::string expert_colour(int64_t e, int64_t n) {
  // Golden-angle hues, so that neighbouring ids differ; two lightness steps for more than 12 experts.
  const double hue = std::fmod(double(e) * 137.508, 360.0);
  const int light = n > 12 && e % 2 ? 80 : 70;
  return "hsl(" + num(hue, 1) + ", 75%, " + std::to_string(light) + "%)";
}

RoutingTraceFile read_routing_trace(const std::string& path, int64_t max_records) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path, "cannot read the trace file");
  RoutingTraceFile t;
  std::string line;
  int64_t n = 0, n_expert = 0;
  size_t n_layers = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      throw FileError(path, "line " + std::to_string(n) + ": not JSON (" + clipped(e.what(), 160) + ")");
    }
    if (!j.is_object()) throw FileError(path, "line " + std::to_string(n) + ": not a JSON object");
    if (t.header.is_null()) {
      if (!j.contains("moeforge_trace"))
        throw FileError(path, "line " + std::to_string(n) +
                                  ": not a routing trace (its first line is the header of moeforge generate "
                                  "--trace / eval --trace)");
      const json& e = need(j, "n_expert", path, n);
      const json& l = need(j, "moe_layers", path, n);
      if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() > 65536 || !l.is_array())
        throw FileError(path,
                        "line " + std::to_string(n) + ": n_expert or moe_layers is not a count / a list");
      n_expert = e.get<int64_t>();
      n_layers = l.size();
      t.header = std::move(j);
      continue;
    }
    if (int64_t(t.records.size()) >= max_records) {
      ++t.left_out;
      continue;
    }
    const json& pos = need(j, "pos", path, n);
    const json& id = need(j, "id", path, n);
    const json& layers = need(j, "layers", path, n);
    if (!pos.is_number_integer() || !id.is_number_integer() || !layers.is_array() ||
        (j.contains("seq") && !j["seq"].is_number_integer()) ||
        (j.contains("text") && !j["text"].is_string()))
      throw FileError(path, "line " + std::to_string(n) +
                                ": pos, id and seq must be integers, text a string, " + "layers a list");
    if (!layers.empty() && layers.size() != n_layers)
      throw FileError(path, "line " + std::to_string(n) + ": " + std::to_string(layers.size()) +
                                " layers, the header has " + std::to_string(n_layers));
    for (const auto& l : layers) {
      if (!l.is_object() || !l.contains("experts") || !l["experts"].is_array() || !l.contains("gates") ||
          !l["gates"].is_array() || l["gates"].size() != l["experts"].size())
        throw FileError(path, "line " + std::to_string(n) + ": a layer without experts and as many gates");
      for (const auto& e : l["experts"])
        if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() >= n_expert)
          throw FileError(path, "line " + std::to_string(n) + ": expert " + e.dump() + " is not in [0, " +
                                    std::to_string(n_expert) + ")");
      for (const auto& g : l["gates"])
        if (!g.is_number()) throw FileError(path, "line " + std::to_string(n) + ": a gate is not a number");
    }
    t.records.push_back(std::move(j));
  }
  if (t.header.is_null()) throw FileError(path, "empty: no trace header");
  return t;
}

std::string routing_trace_page(const RoutingTraceFile& t, const std::string& title) {
  const int64_t E = t.header.value("n_expert", int64_t(0));
  std::vector<int64_t> blocks;
  for (const auto& b : t.header["moe_layers"])
    blocks.push_back(b.is_number_integer() ? b.get<int64_t>() : -1);
  const size_t L = blocks.size();
  std::vector<std::string> domains;
  if (t.header.contains("domains") && t.header["domains"].is_array())
    for (const auto& d : t.header["domains"])
      if (d.is_string()) domains.push_back(d.get<std::string>());

  // Sequences in order of appearance; per layer, loads and the domain x expert counts.
  std::vector<int64_t> seq_order;
  std::map<int64_t, std::vector<const json*>> seqs;
  std::vector<std::vector<int64_t>> load(L, std::vector<int64_t>(size_t(E), 0));
  std::map<std::string, std::vector<std::vector<int64_t>>> dom_counts;  // domain -> [layer][expert]
  for (const auto& r : t.records) {
    const int64_t s = r.value("seq", int64_t(0));
    if (!seqs.count(s)) seq_order.push_back(s);
    seqs[s].push_back(&r);
    std::string dom;
    if (r.contains("domain") && r["domain"].is_string()) dom = r["domain"].get<std::string>();
    if (!dom.empty() && !dom_counts.count(dom)) dom_counts[dom].assign(L, std::vector<int64_t>(size_t(E), 0));
    const auto& layers = r["layers"];
    for (size_t l = 0; l < layers.size() && l < L; ++l)
      for (const auto& e : layers[l]["experts"]) {
        ++load[l][e.get<int64_t>()];
        if (!dom.empty()) ++dom_counts[dom][l][e.get<int64_t>()];
      }
  }
  if (domains.empty())
    for (auto& [d, c] : dom_counts) domains.push_back(d);

  std::ostringstream h;
  h << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>" << esc(title)
    << "</title>\n<style>\n"
    << "body{font:14px/1.5 system-ui,sans-serif;margin:16px 24px;color:#111;background:#fff}\n"
    << "h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:16px 0 6px}\n"
    << ".meta{color:#555;margin:0 0 12px}\n"
    << ".tabs input{display:none}.tabs label{display:inline-block;padding:4px 12px;margin-right:4px;"
       "border:1px solid #bbb;border-radius:4px 4px 0 0;cursor:pointer;background:#f3f3f3}\n"
    << ".layer{display:none;border-top:1px solid #bbb;padding-top:8px}\n"
    << ".seq{margin:6px 0 10px;white-space:pre-wrap;word-wrap:break-word}\n"
    << ".seqhead{display:block;color:#666;font-size:12px}\n"
    << ".tok{border-radius:3px;padding:1px 0;cursor:default}\n"
    << ".tok.prompt{text-decoration:underline dotted #444}\n"
    << ".tok.none{background:#e4e4e4}.tok.unrouted{outline:1px dashed #999}\n"
    << ".tok:hover{outline:2px solid #000}\n"
    << ".bars{display:grid;grid-template-columns:4em 1fr 9em;gap:2px 8px;max-width:720px;font-size:12px}\n"
    << ".bar{height:12px;align-self:center;border:1px solid #0003}\n"
    << "table.dom{border-collapse:collapse;font-size:12px;margin-top:6px}\n"
    << "table.dom td,table.dom th{border:1px solid #ccc;padding:1px 5px;text-align:right}\n"
    << "#moeforge-info{position:fixed;right:12px;bottom:12px;max-width:420px;background:#fffbe6;"
       "border:1px solid #cca;padding:6px 8px;font-size:12px;white-space:pre-wrap;display:none}\n"
    << ".legend span{display:inline-block;padding:0 6px;margin:1px;border-radius:3px;font-size:12px}\n";
  for (size_t l = 0; l < L; ++l)
    h << "#tab" << l << ":checked~#layers #layer" << l << "{display:block}#tab" << l
      << ":checked+label{background:#fff;"
      << "font-weight:bold}\n";
  h << "</style></head><body>\n";
  h << "<h1>" << esc(title) << "</h1>\n<p class=\"meta\">router <b>"
    << esc(t.header.value("router", std::string("?"))) << "</b> &middot; " << E << " experts &middot; " << L
    << " MoE layers &middot; " << t.records.size() << " tokens in " << seq_order.size()
    << (seq_order.size() == 1 ? " sequence" : " sequences") << " &middot; from "
    << esc(t.header.value("source", std::string("?")));
  if (t.left_out > 0) h << " &middot; <b>" << t.left_out << " more tokens not shown</b>";
  h << "</p>\n<div id=\"moeforge-trace\" data-tokens=\"" << t.records.size() << "\" data-layers=\"" << L
    << "\" data-experts=\"" << E << "\">\n";
  h << "<p class=\"legend\">colour = the token's expert of the largest gate in the layer shown; hover a "
       "token "
       "for its experts, gates and router fields; <span class=\"tok prompt\">dotted</span> = prompt, "
       "<span class=\"tok none\">grey</span> = no expert.<br>";
  for (int64_t e = 0; e < E; ++e)
    h << "<span style=\"background:" << expert_colour(e, E) << "\">e" << e << "</span>";
  h << "</p>\n<div class=\"tabs\">\n";
  for (size_t l = 0; l < L; ++l) {
    h << "<input type=\"radio\" name=\"layer\" id=\"tab" << l << "\"" << (l == 0 ? " checked" : "")
      << "><label for=\"tab" << l << "\">layer " << blocks[l] << "</label>\n";
  }
  h << "<div id=\"layers\">\n";
  for (size_t l = 0; l < L; ++l) {
    h << "<section class=\"layer\" id=\"layer" << l << "\">\n<h2>MoE layer " << l << " (block " << blocks[l]
      << ")</h2>\n";
    for (int64_t s : seq_order) {
      const auto& toks = seqs[s];
      h << "<div class=\"seq\"><span class=\"seqhead\">sequence " << s;
      const json& first = *toks.front();
      if (first.contains("doc")) h << " &middot; document " << esc(field_text(first["doc"]));
      if (first.contains("domain") && first["domain"].is_string())
        h << " &middot; " << esc(first["domain"].get<std::string>());
      h << "</span>";
      for (const json* rp : toks) {
        const json& r = *rp;
        const auto& layers = r["layers"];
        std::string cls = "tok", style, tip;
        tip = "position " + std::to_string(r["pos"].get<int64_t>()) + ", token " +
              std::to_string(r["id"].get<int64_t>()) + " \"" + text_of(r) + "\"";
        if (r.value("prompt", false)) cls += " prompt";
        if (layers.size() <= l) {
          cls += " unrouted";
          tip += "\nnot routed (the generation ended with it)";
        } else {
          const auto& ly = layers[l];
          const auto& ex = ly["experts"];
          const auto& g = ly["gates"];
          if (ex.empty()) {
            cls += " none";
            tip += "\nno expert";
          } else {
            size_t best = 0;
            for (size_t i = 1; i < g.size(); ++i)
              if (g[i].get<double>() > g[best].get<double>()) best = i;
            style = " style=\"background:" + expert_colour(ex[best].get<int64_t>(), E) + "\"";
            tip += "\nexperts:";
            for (size_t i = 0; i < ex.size(); ++i)
              tip += " e" + std::to_string(ex[i].get<int64_t>()) + " " + num(g[i].get<double>(), 3);
          }
          for (auto& [k, v] : ly.items())
            if (k != "layer" && k != "experts" && k != "gates") tip += "\n" + k + ": " + field_text(v);
        }
        h << "<span class=\"" << cls << "\"" << style << " title=\"" << esc(tip) << "\">" << esc(text_of(r))
          << "</span>";
      }
      h << "</div>\n";
    }
    // Load per expert.
    int64_t total = 0;
    for (int64_t c : load[l]) total += c;
    std::vector<double> ld(load[l].begin(), load[l].end());
    h << "<h2>load per expert (" << total << " assignments; MaxVio "
      << num(total > 0 ? max_violation(ld) : 0.0, 3) << ")</h2>\n<div class=\"bars\">\n";
    const int64_t most = std::max<int64_t>(1, *std::max_element(load[l].begin(), load[l].end()));
    for (int64_t e = 0; e < E; ++e) {
      const double share = total > 0 ? 100.0 * double(load[l][e]) / double(total) : 0.0;
      h << "<span>e" << e << "</span><span><span class=\"bar\" style=\"display:block;width:"
        << num(100.0 * double(load[l][e]) / double(most), 1) << "%;background:" << expert_colour(e, E)
        << "\"></span></span><span>" << load[l][e] << " (" << num(share, 1) << "%)</span>\n";
    }
    h << "</div>\n";
    if (!dom_counts.empty()) {
      h << "<h2>domain &times; expert (assignments; shade = share of the domain's row)</h2>\n<table "
           "class=\"dom\"><tr><th>domain</th>";
      for (int64_t e = 0; e < E; ++e) h << "<th>e" << e << "</th>";
      h << "</tr>\n";
      for (const auto& d : domains) {
        auto it = dom_counts.find(d);
        if (it == dom_counts.end()) continue;
        const auto& row = it->second[l];
        int64_t sum = 0;
        for (int64_t c : row) sum += c;
        h << "<tr><th>" << esc(d) << "</th>";
        for (int64_t e = 0; e < E; ++e) {
          const double a = sum > 0 ? double(row[e]) / double(sum) : 0.0;
          h << "<td style=\"background:rgba(30,90,200," << num(std::min(1.0, 2.5 * a), 3) << ")\">" << row[e]
            << "</td>";
        }
        h << "</tr>\n";
      }
      h << "</table>\n";
    }
    h << "</section>\n";
  }
  h << "</div></div></div>\n<div id=\"moeforge-info\"></div>\n";
  // The render check (tests/test_trace.cpp): the computed style of the first coloured token, written where
  // a DOM dump shows it; and the hover panel.
  h << "<div id=\"moeforge-render-check\"></div>\n<script>\n"
       "(function(){var t=document.querySelector('.layer .tok[style]');var c=document.getElementById("
       "'moeforge-render-check');var l=document.querySelector('.layer');"
       "c.setAttribute('data-token-background',t?getComputedStyle(t).backgroundColor:'none');"
       "c.setAttribute('data-layer-display',l?getComputedStyle(l).display:'none');"
       "c.setAttribute('data-tokens',String(document.querySelectorAll('.layer .tok').length));"
       "var info=document.getElementById('moeforge-info');"
       "document.addEventListener('mouseover',function(ev){var s=ev.target;"
       "if(s.classList&&s.classList.contains('tok')){info.textContent=s.title;info.style.display='block';}});"
       "})();\n</script>\n</body></html>\n";
  return h.str();
}

}  // namespace moeforge
