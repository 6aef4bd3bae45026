// The page of a routing trace (docs/serve.md, "The page"): `moeforge trace-view` turns the JSON lines that
// `generate --trace` and `eval --trace` write (model/trace.h) into one self-contained HTML file, with no
// network and no external script: the text with each token coloured by its expert, layer by layer (one tab
// per MoE layer), its experts, gates and router fields on hover, each layer's load per expert as bars, and,
// when the records carry a domain (a batch of documents), the domain x expert table of each layer.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace moeforge {

struct RoutingTraceFile {
  nlohmann::json header;                // the first line (trace_header)
  std::vector<nlohmann::json> records;  // one per token
  int64_t left_out = 0;                 // records past the reader's limit, not read
};

// Reads a trace file. Anything that is not a trace (no header line, a line that is not JSON, a record
// without pos, id or layers, an expert out of range) is a FileError naming the file and the line. At most
// `max_records` token records are kept (the rest are counted in left_out).
RoutingTraceFile read_routing_trace(const std::string& path, int64_t max_records = 100000);

// The page. `title` heads it (the trace file's name, say).
std::string routing_trace_page(const RoutingTraceFile& trace, const std::string& title);

// The colour of expert `e` of `n` on the page, "hsl(h, s%, l%)": distinct neighbours, light enough for
// black text.
std::string expert_colour(int64_t e, int64_t n);

}  // namespace moeforge
