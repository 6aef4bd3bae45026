// Routing traces and their page (docs/serve.md, "Traces", "The page"): a generation's trace is the routing
// its forwards used, token by token and layer by layer (checked against the layers' plans and against a
// full forward of the same tokens); every registered router's trace fields are there; the page reads the
// trace, refuses what is not one, and renders in headless Chromium (a computed style and a screenshot).
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "moeforge/experiments/trace_page.h"
#include "moeforge/model/generate.h"
#include "moeforge/model/trace.h"
#include "moeforge/routing/registry.h"
#include "moeforge/util/browser.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

ModelConfig tiny_model() {
  ModelConfig m;
  m.vocab_size = 40;
  m.d_model = 16;
  m.n_head = 2;
  m.n_layer = 3;
  m.d_ff = 20;
  m.moe_every = 1;
  m.max_seq_len = 32;
  return m;
}

MoEConfig moe_of(const std::string& router) {
  MoEConfig c;
  c.router = router;
  c.n_expert = 8;
  c.n_expert_used = 2;
  c.d_expert = 8;
  c.n_cluster = 2;
  return c;
}

// A model of `router` whose routers have some state (two training forwards and their after_step: MoCE's
// centroids, expert choice's thresholds, the loss-free bias, reliabilities), in eval mode.
TransformerLM stateful_model(const std::string& router, uint64_t seed) {
  torch::manual_seed(int64_t(seed));
  TransformerLM model(tiny_model(), moe_of(router));
  model->train();
  for (int i = 0; i < 2; ++i) {
    auto tokens = torch::randint(0, 40, {4, 16}, torch::kLong);
    RouteContext ctx;
    auto out = model->forward(tokens, ctx);
    model->add_token_loss(torch::ones({4 * 16}));
    model->after_step();
  }
  model->eval();
  return model;
}

struct Traced {
  std::vector<int64_t> prompt, generated;
  std::vector<nlohmann::json> records;
  std::vector<std::vector<RoutingPlan>> plans;  // per forward, per MoE layer
  std::vector<int64_t> starts, lengths;         // per forward: first position, positions
};

Traced traced_generation(TransformerLM& model, const std::vector<int64_t>& prompt, int64_t max_tokens) {
  Traced t;
  t.prompt = prompt;
  RoutingTracer tracer(*model, nullptr);
  GenerateHooks hooks;
  hooks.on_step = [&](const torch::Tensor& input, int64_t start, const LMOutput& out) {
    for (auto& r : tracer.step(input, start, out, {}, int64_t(prompt.size()))) t.records.push_back(r);
    t.plans.push_back(out.plans);
    t.starts.push_back(start);
    t.lengths.push_back(input.size(1));
  };
  GenerateOptions opt;
  opt.max_tokens = max_tokens;
  opt.temperature = 0;
  t.generated = generate(model, prompt, opt, nullptr, hooks);
  return t;
}

// Token t's experts and gates in a plan, read straight from its assignments.
std::pair<std::vector<int64_t>, std::vector<double>> assignments_of(const RoutingPlan& plan, int64_t t) {
  std::vector<int64_t> experts;
  std::vector<double> gates;
  const auto off = plan.offsets();
  auto idx = plan.token_index.to(torch::kCPU).contiguous();
  auto g = plan.gate.detach().to(torch::kCPU, torch::kDouble).contiguous();
  for (size_t e = 0; e + 1 < off.size(); ++e)
    for (int64_t i = off[e]; i < off[e + 1]; ++i)
      if (idx.data_ptr<int64_t>()[i] == t) {
        experts.push_back(int64_t(e));
        gates.push_back(g.data_ptr<double>()[i]);
      }
  return {experts, gates};
}

std::vector<double> doubles(const nlohmann::json& j) {
  return j.get<std::vector<double>>();
}

// The trace of a generation is the routing of the forwards that generation ran: every routed position once,
// in order, with the experts and gates of its layer's plan; and, the routers being causal, the routing a
// full forward over the same tokens gives each position.
TEST(Trace, GenerationTraceIsTheRoutingOfItsForwards) {
  for (const auto& spec : router_registry()) {
    SCOPED_TRACE(spec.name);
    auto model = stateful_model(spec.name, 11);
    const std::vector<int64_t> prompt = {1, 5, 9, 2, 7, 3};
    const auto t = traced_generation(model, prompt, 8);
    ASSERT_EQ(t.generated.size(), 8u);
    // Positions 0..P+6: the prompt's forward, then every new token but the last (never fed back).
    ASSERT_EQ(t.records.size(), prompt.size() + t.generated.size() - 1);
    std::vector<int64_t> all = prompt;
    all.insert(all.end(), t.generated.begin(), t.generated.end());
    size_t k = 0;
    for (size_t f = 0; f < t.plans.size(); ++f)
      for (int64_t s = 0; s < t.lengths[f]; ++s, ++k) {
        const auto& r = t.records[k];
        const int64_t pos = t.starts[f] + s;
        ASSERT_EQ(r["pos"].get<int64_t>(), pos);
        EXPECT_EQ(r["id"].get<int64_t>(), all[pos]);
        EXPECT_EQ(r.value("prompt", false), pos < int64_t(prompt.size()));
        ASSERT_EQ(r["layers"].size(), 3u);  // every block is MoE
        for (size_t l = 0; l < 3; ++l) {
          const auto [experts, gates] = assignments_of(t.plans[f][l], s);
          EXPECT_EQ(r["layers"][l]["layer"].get<int64_t>(), int64_t(l));
          EXPECT_EQ(r["layers"][l]["experts"].get<std::vector<int64_t>>(), experts) << "position " << pos;
          const auto traced = doubles(r["layers"][l]["gates"]);
          ASSERT_EQ(traced.size(), gates.size());
          for (size_t i = 0; i < gates.size(); ++i) EXPECT_NEAR(traced[i], gates[i], 1e-6);
        }
      }
    // A full forward of the routed tokens routes each position as the cached generation did.
    if (!model->moe_layers().front()->router->causal()) continue;
    torch::NoGradGuard ng;
    RouteContext ctx;
    ctx.generating = true;
    ctx.prompt_len = torch::tensor({int64_t(prompt.size())}, torch::kLong);
    const std::vector<int64_t> routed(all.begin(), all.end() - 1);
    auto full = model->forward(torch::tensor(routed, torch::kLong).unsqueeze(0), ctx);
    for (size_t pos = 0; pos < routed.size(); ++pos)
      for (size_t l = 0; l < 3; ++l) {
        const auto [experts, gates] = assignments_of(full.plans[l], int64_t(pos));
        EXPECT_EQ(t.records[pos]["layers"][l]["experts"].get<std::vector<int64_t>>(), experts)
            << "position " << pos << ", layer " << l;
        const auto traced = doubles(t.records[pos]["layers"][l]["gates"]);
        if (traced.size() == gates.size()) {
          for (size_t i = 0; i < gates.size(); ++i) EXPECT_NEAR(traced[i], gates[i], 2e-5);
        }
      }
  }
}

// Every registered router's trace fields (Router::trace_fields) are in each layer entry, as the router
// gives them; for the routers that add some, the fields are what their state says.
TEST(Trace, EveryRegisteredRouterTracesItsFields) {
  // The fields of the routers that add some (a router not listed adds none, or is checked generically).
  const std::map<std::string, std::set<std::string>> expected = {
      {"moce", {"cluster"}},
      {"hierarchical", {"clusters", "cluster_reliability", "expert_reliability"}},
      {"expert_choice", {"thresholds", "scores", "threshold_steps"}},
      {"loss_free", {"bias"}},
      {"bip", {"dual"}}};
  for (const auto& spec : router_registry()) {
    SCOPED_TRACE(spec.name);
    auto model = stateful_model(spec.name, 12);
    const auto t = traced_generation(model, {2, 4, 6, 8}, 5);
    const auto layers = model->moe_layers();
    size_t k = 0;
    for (size_t f = 0; f < t.plans.size(); ++f)
      for (int64_t s = 0; s < t.lengths[f]; ++s, ++k)
        for (size_t l = 0; l < layers.size(); ++l) {
          const auto& entry = t.records[k]["layers"][l];
          ASSERT_TRUE(entry.contains("experts") && entry.contains("gates"));
          const auto experts = entry["experts"].get<std::vector<int64_t>>();
          const auto fields = layers[l]->router->trace_fields(t.plans[f][l], s, experts);
          ASSERT_TRUE(fields.is_object());
          for (auto& [key, value] : fields.items()) {
            ASSERT_TRUE(entry.contains(key)) << key;
            EXPECT_EQ(entry[key], value) << key;
          }
          auto it = expected.find(spec.name);
          if (it == expected.end()) continue;
          for (const auto& key : it->second)
            EXPECT_TRUE(entry.contains(key)) << key << " in " << entry.dump();
          if (spec.name == "moce") {
            const auto clusters = test::moce_token_clusters(t.plans[f][l]);
            EXPECT_EQ(entry["cluster"].get<int64_t>(), clusters[s].item<int64_t>());
            // Stage 2 picks inside the cluster's group of E / G = 4 experts.
            for (int64_t e : experts) EXPECT_EQ(e / 4, entry["cluster"].get<int64_t>());
          } else if (spec.name == "hierarchical") {
            std::set<int64_t> clusters;
            for (int64_t e : experts) clusters.insert(e / 4);
            EXPECT_EQ(entry["clusters"].get<std::vector<int64_t>>(),
                      std::vector<int64_t>(clusters.begin(), clusters.end()));
            EXPECT_EQ(entry["expert_reliability"].size(), experts.size());
          } else if (spec.name == "expert_choice") {
            ASSERT_EQ(entry["thresholds"].size(), experts.size());
            ASSERT_EQ(entry["scores"].size(), experts.size());
            // Generation routes by the thresholds: a chosen expert's score passes its threshold, unless it is
            // the one expert a token gets when none passes.
            if (experts.size() > 1) {
              for (size_t i = 0; i < experts.size(); ++i)
                EXPECT_GE(entry["scores"][i].get<double>(), entry["thresholds"][i].get<double>() - 1e-6);
            }
          }
        }
  }
}

fs::path fresh_dir(const std::string& name) {
  const auto d = fs::path(::testing::TempDir()) / ("moeforge_trace_" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// A trace file of a small generation with a real tokenizer (pieces), as `generate --trace` writes it.
fs::path write_trace(const fs::path& dir, const std::string& router) {
  std::vector<std::string> texts;
  for (int i = 0; i < 60; ++i)
    texts.push_back("the cat sat on the mat number " + std::to_string(i) + " and the dog ran to the park");
  auto tok = Tokenizer::train(texts, 40, 1);
  auto model = stateful_model(router, 13);
  RoutingTracer tracer(*model, &tok);
  std::vector<nlohmann::json> records;
  GenerateHooks hooks;
  const auto prompt_ids = [&] {
    auto ids = tok.encode("the cat sat on");
    ids.insert(ids.begin(), tok.bos_id());
    return ids;
  }();
  hooks.on_step = [&](const torch::Tensor& input, int64_t start, const LMOutput& out) {
    for (auto& r : tracer.step(input, start, out, {}, int64_t(prompt_ids.size()))) records.push_back(r);
  };
  GenerateOptions opt;
  opt.max_tokens = 10;
  opt.temperature = 0;
  const auto out = generate(model, prompt_ids, opt, nullptr, hooks);
  records.push_back(tracer.unrouted(out.back(), int64_t(prompt_ids.size() + out.size()) - 1));
  const auto path = dir / (router + ".jsonl");
  std::ofstream os(path);
  os << trace_header(*model, "generate").dump() << "\n";
  for (const auto& r : records) os << r.dump() << "\n";
  return path;
}

TEST(TracePage, ReadsATraceAndDrawsEveryLayer) {
  const auto dir = fresh_dir("page");
  const auto path = write_trace(dir, "moce");
  const auto t = read_routing_trace(path.string());
  EXPECT_EQ(t.header["router"], "moce");
  ASSERT_FALSE(t.records.empty());
  EXPECT_EQ(t.records.front()["text"], "<s>");
  EXPECT_FALSE(t.records.back()["routed"].get<bool>());
  std::string text;
  for (const auto& r : t.records) text += r["text"].get<std::string>();
  EXPECT_EQ(text.rfind("<s>the cat sat on", 0), 0u) << text;  // pieces in context, spaces included
  const std::string html = routing_trace_page(t, "trace & <page>");
  EXPECT_NE(html.find("trace &amp; &lt;page&gt;"), std::string::npos);  // escaped
  for (int l = 0; l < 3; ++l)
    EXPECT_NE(html.find("id=\"layer" + std::to_string(l) + "\""), std::string::npos);
  EXPECT_NE(html.find("cluster: "), std::string::npos);  // the router's field on hover
  EXPECT_NE(html.find("load per expert"), std::string::npos);
  EXPECT_EQ(html.find("http://"), std::string::npos);  // self-contained: nothing fetched
  EXPECT_EQ(html.find("https://"), std::string::npos);
  EXPECT_EQ(html.find("src="), std::string::npos);
  // A batch of documents gets its domain x expert table.
  auto docs = t;
  for (size_t i = 0; i < docs.records.size(); ++i) docs.records[i]["domain"] = i % 2 ? "news" : "fiction";
  EXPECT_NE(routing_trace_page(docs, "docs").find("domain &times; expert"), std::string::npos);
  // The limit on what is read.
  EXPECT_EQ(read_routing_trace(path.string(), 3).left_out, int64_t(t.records.size()) - 3);
}

TEST(TracePage, RefusesWhatIsNotATraceNamingTheLine) {
  const auto dir = fresh_dir("bad");
  auto refused = [&](const std::string& content, const std::string& says) {
    const auto p = dir / "t.jsonl";
    std::ofstream(p) << content;
    try {
      read_routing_trace(p.string());
      ADD_FAILURE() << "read: " << content;
    } catch (const FileError& e) {
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
      EXPECT_EQ(e.path(), p.string());
    }
  };
  const std::string header = R"({"moeforge_trace": 1, "n_expert": 4, "moe_layers": [0, 1]})";
  refused("", "no trace header");
  refused("{\"pos\": 0}\n", "line 1: not a routing trace");
  refused(header + "\nnot json\n", "line 2: not JSON");
  refused(header + "\n{\"id\": 1, \"layers\": []}\n", "line 2: the record has no \"pos\"");
  refused(header + "\n{\"pos\": 0, \"id\": 1, \"layers\": [{\"experts\": [9], \"gates\": [1]}, " +
              "{\"experts\": [0], \"gates\": [1]}]}\n",
          "line 2: expert 9 is not in [0, 4)");
  refused(header + "\n{\"pos\": 0, \"id\": 1, \"layers\": [{\"experts\": [1], \"gates\": []}, " +
              "{\"experts\": [0], \"gates\": [1]}]}\n",
          "as many gates");
  refused(header + "\n{\"pos\": 0, \"id\": 1, \"layers\": [{\"experts\": [1], \"gates\": [1]}]}\n",
          "1 layers, the header has 2");
  refused(R"({"moeforge_trace": 1, "n_expert": "many", "moe_layers": []})", "line 1: n_expert");
}

// A PNG's size and how many of its pixels differ from the first (one colour = a blank picture). 8-bit
// RGB / RGBA, not interlaced: what Chromium writes.
struct Picture {
  int64_t width = 0, height = 0, differing = 0, colours = 0;
};
Picture read_png(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::string d((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Picture p;
  if (d.size() < 33 || d.compare(1, 3, "PNG") != 0) return p;
  auto be32 = [&](size_t at) {
    return (uint32_t(uint8_t(d[at])) << 24) | (uint32_t(uint8_t(d[at + 1])) << 16) |
           (uint32_t(uint8_t(d[at + 2])) << 8) | uint32_t(uint8_t(d[at + 3]));
  };
  std::string idat;
  int depth = 0, type = 0, interlace = 0;
  for (size_t at = 8; at + 8 <= d.size();) {
    const uint32_t len = be32(at);
    const std::string kind = d.substr(at + 4, 4);
    if (kind == "IHDR") {
      p.width = be32(at + 8);
      p.height = be32(at + 12);
      depth = uint8_t(d[at + 16]);
      type = uint8_t(d[at + 17]);
      interlace = uint8_t(d[at + 20]);
    } else if (kind == "IDAT") {
      idat += d.substr(at + 8, len);
    }
    at += 12 + len;
  }
  if (depth != 8 || (type != 2 && type != 6) || interlace != 0) return p;
  const int64_t bpp = type == 6 ? 4 : 3, stride = p.width * bpp;
  std::vector<uint8_t> raw(size_t((stride + 1) * p.height));
  uLongf n = raw.size();
  if (uncompress(raw.data(), &n, reinterpret_cast<const Bytef*>(idat.data()), idat.size()) != Z_OK) return p;
  std::vector<uint8_t> img(size_t(stride * p.height)), prev(size_t(stride), 0);
  for (int64_t y = 0; y < p.height; ++y) {
    const uint8_t f = raw[size_t(y * (stride + 1))];
    const uint8_t* src = &raw[size_t(y * (stride + 1) + 1)];
    uint8_t* row = &img[size_t(y * stride)];
    for (int64_t x = 0; x < stride; ++x) {
      const int a = x >= bpp ? row[x - bpp] : 0, b = prev[x], c = x >= bpp ? prev[x - bpp] : 0;
      int v = src[x];
      if (f == 1) v += a;
      if (f == 2) v += b;
      if (f == 3) v += (a + b) / 2;
      if (f == 4) {
        const int pa = std::abs(b - c), pb = std::abs(a - c), pc = std::abs(a + b - 2 * c);
        v += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      }
      row[x] = uint8_t(v);
    }
    std::copy(row, row + stride, prev.begin());
  }
  std::set<uint32_t> colours;
  for (int64_t i = 0; i < p.width * p.height; ++i) {
    const uint8_t* px = &img[size_t(i * bpp)];
    const uint32_t c = (uint32_t(px[0]) << 16) | (uint32_t(px[1]) << 8) | px[2];
    if (colours.size() < 100000) colours.insert(c);
    p.differing += (px[0] != img[0] || px[1] != img[1] || px[2] != img[2]);
  }
  p.colours = int64_t(colours.size());
  return p;
}

// The page in a real browser (Debian's chromium, headless): the first layer's tab is shown, a token has the
// background colour of its expert (the page's own script writes the computed style into a marker element,
// read back from the DOM dump), and the screenshot is a picture of many colours, not a blank one.
TEST(TracePage, RendersInHeadlessChromium) {
  const auto dir = fresh_dir("browser");
  const auto t = read_routing_trace(write_trace(dir, "hierarchical").string());
  const auto html = dir / "page.html";
  std::ofstream(html) << routing_trace_page(t, "render check");
  std::string dom;
  try {
    dom = dump_page_dom(html.string());
  } catch (const FileError& e) {
    FAIL() << e.what() << " (scripts/install-deps.sh installs Debian's chromium)";
  }
  const size_t at = dom.find("id=\"moeforge-render-check\"");
  ASSERT_NE(at, std::string::npos) << dom.substr(0, 2000);
  const std::string marker = dom.substr(at, dom.find('>', at) - at);
  EXPECT_NE(marker.find("data-layer-display=\"block\""), std::string::npos) << marker;
  EXPECT_NE(marker.find("data-token-background=\"rgb("), std::string::npos) << marker;
  EXPECT_EQ(marker.find("rgba(0, 0, 0, 0)"), std::string::npos) << marker;  // not transparent
  EXPECT_NE(marker.find("data-tokens=\"" + std::to_string(3 * t.records.size()) + "\""), std::string::npos)
      << marker;
  const auto png = dir / "page.png";
  screenshot_page(html.string(), png.string(), 900, 700);
  const auto pic = read_png(png);
  EXPECT_EQ(pic.width, 900);
  EXPECT_EQ(pic.height, 700);
  EXPECT_GT(pic.differing, 900 * 700 / 50) << "the screenshot is (nearly) blank";
  EXPECT_GT(pic.colours, 8) << "the screenshot has too few colours for coloured tokens";
}

TEST(TracePage, ColoursAreDistinctPerExpert) {
  std::set<std::string> c;
  for (int64_t e = 0; e < 64; ++e) c.insert(expert_colour(e, 64));
  EXPECT_EQ(c.size(), 64u);
}

}  // namespace
}  // namespace moeforge
