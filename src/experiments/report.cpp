#include "moeforge/experiments/report.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <sstream>

#include "moeforge/util/atomic_file.h"
#include "moeforge/util/error.h"
#include "moeforge/util/gnuplot.h"

namespace fs = std::filesystem;

namespace moeforge {
namespace {

// A number of a metrics line; NaN for null (a non-finite loss is written as null) or a missing key.
double number_or_nan(const nlohmann::json& j, const char* key) {
  return j.contains(key) && j[key].is_number() ? j[key].get<double>() : std::nan("");
}

void write_text(const fs::path& path, const std::string& text) {
  write_file_atomic(path.string(), text);
}

std::string quote(const std::string& s) {
  return "'" + s + "'";
}

}  // namespace

double unigram_perplexity(const PackedData& train, const PackedData& eval, int64_t vocab_size) {
  // A chunk of rows at a time, so that shards are read, not held (docs/data.md).
  const int64_t chunk = 4096;
  auto targets = [&](const PackedData& d, int64_t start) {
    auto t = d.row_range(start, std::min(chunk, d.size() - start)).tokens;  // [n, S + 1]
    return t.narrow(1, 1, t.size(1) - 1).reshape(-1);
  };
  auto counts = torch::ones({vocab_size}, torch::kDouble);  // add-one smoothing
  for (int64_t i = 0; i < train.size(); i += chunk)
    counts += torch::bincount(targets(train, i), {}, vocab_size).to(torch::kDouble);
  auto logp = (counts / counts.sum()).log();
  double sum = 0;
  int64_t n = 0;
  for (int64_t i = 0; i < eval.size(); i += chunk) {
    auto ev = targets(eval, i);
    sum += logp.index_select(0, ev).sum().item<double>();
    n += ev.numel();
  }
  return std::exp(-sum / double(std::max<int64_t>(n, 1)));
}

std::string write_report(const ReportInputs& in) {
  const fs::path dir(in.run_dir), plots = dir / "plots";
  fs::create_directories(plots);
  // Read metrics.jsonl.
  std::ifstream metrics(dir / "metrics.jsonl");
  if (!metrics) throw FileError((dir / "metrics.jsonl").string(), "missing: nothing to report");
  std::ostringstream train_dat, val_dat, held_dat;
  std::vector<std::ostringstream> load_dat;
  size_t n_layer = 0, n_expert = 0;
  int line_no = 0;
  for (std::string line; std::getline(metrics, line);) {
    ++line_no;
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception& e) {
      throw FileError((dir / "metrics.jsonl").string() + ":" + std::to_string(line_no), "not JSON");
    }
    const auto split = j.value("split", "");
    const int64_t step = j.value("step", int64_t{0});
    if (split == "train") {
      train_dat << step << " " << number_or_nan(j, "loss") << " " << number_or_nan(j, "max_vio_batch")
                << "\n";
      if (j.contains("load")) {
        const auto& loads = j["load"];
        n_layer = loads.size();
        if (load_dat.size() < n_layer) load_dat.resize(n_layer);
        for (size_t l = 0; l < n_layer; ++l) {
          std::vector<double> v = loads[l].get<std::vector<double>>();
          n_expert = v.size();
          double total = 0;
          for (double x : v) total += x;
          load_dat[l] << step;
          for (double x : v) load_dat[l] << " " << (total > 0 ? x / total : 0.0);
          load_dat[l] << "\n";
        }
      }
    } else if (split == "validation") {
      val_dat << step << " " << number_or_nan(j, "loss") << "\n";
    } else if (split == "heldout") {
      held_dat << step << " " << number_or_nan(j, "loss") << "\n";
    }
  }
  write_text(plots / "train.dat", train_dat.str());
  write_text(plots / "validation.dat", val_dat.str() + "\n");
  write_text(plots / "heldout.dat", held_dat.str() + "\n");

  std::ostringstream gp;
  // noenhanced: names like press_reportage are text, not subscripts.
  gp << "set terminal pngcairo noenhanced size 900,500 font 'sans,10'\n"
     << "set output " << quote((plots / "loss.png").string()) << "\n"
     << "set title 'Loss'\nset xlabel 'step'\nset ylabel 'cross-entropy (nats)'\nset grid\nset key top "
        "right\n"
     << "plot " << quote((plots / "train.dat").string()) << " using 1:2 with lines lw 1 title 'train', "
     << quote((plots / "validation.dat").string())
     << " using 1:2 with linespoints lw 2 pt 7 title 'validation'";
  if (!held_dat.str().empty())
    gp << ", " << quote((plots / "heldout.dat").string())
       << " using 1:2 with linespoints lw 2 pt 5 title 'held-out genres'";
  gp << "\n";
  std::vector<std::string> images = {"loss.png"};
  if (n_layer > 0 && n_expert > 0) {
    for (size_t l = 0; l < n_layer; ++l)
      write_text(plots / ("load_layer" + std::to_string(l) + ".dat"), load_dat[l].str());
    gp << "set terminal pngcairo noenhanced size 900," << 260 * n_layer << " font 'sans,9'\n"
       << "set output " << quote((plots / "load.png").string()) << "\n"
       << "set multiplot layout " << n_layer
       << ",1 title 'Expert load share per MoE layer (training batches)'\n"
       << "set key outside right\nset ylabel 'share of assignments'\nset xlabel 'step'\n";
    for (size_t l = 0; l < n_layer; ++l) {
      gp << "set title 'MoE layer " << l << "'\nplot ";
      for (size_t e = 0; e < n_expert; ++e)
        gp << (e ? ", " : "") << quote((plots / ("load_layer" + std::to_string(l) + ".dat")).string())
           << " using 1:" << e + 2 << " with lines title 'e" << e << "'";
      gp << "\n";
    }
    gp << "unset multiplot\n";
    images.push_back("load.png");
  }
  if (in.validation && !in.validation->layers.empty()) {
    const auto& v = *in.validation;
    const size_t L = v.layers.size();
    gp << "set terminal pngcairo noenhanced size 900," << 60 + 30 * v.domains.size() * L + 60 * L
       << " font 'sans,9'\n"
       << "set output " << quote((plots / "expert_domain.png").string()) << "\n"
       << "set multiplot layout " << L << ",1 title 'P(expert | domain), validation set'\n"
       << "unset key\nunset ylabel\nset xlabel 'expert'\nset palette defined (0 'white', 1 '#08306b')\nset "
          "cbrange [0:*]\n";
    for (size_t l = 0; l < L; ++l) {
      std::ostringstream mat;
      std::ostringstream ytics;
      ytics << "set ytics (";
      int row = 0;
      for (size_t d = 0; d < v.domains.size(); ++d) {
        const auto& counts = v.layers[l].domain_expert[d];
        double total = 0;
        for (auto c : counts) total += double(c);
        if (total <= 0) continue;
        for (auto c : counts) mat << double(c) / total << " ";
        mat << "\n";
        ytics << (row ? ", " : "") << "'" << v.domains[d] << "' " << row;
        ++row;
      }
      ytics << ")\n";
      const auto file = plots / ("expert_domain_layer" + std::to_string(l) + ".dat");
      write_text(file, mat.str());
      // A layer with no counted assignment (its inputs were NaN, e.g. behind a faulty expert) has no
      // matrix to draw: gnuplot rejects an empty one, so its panel says so instead.
      if (row == 0) {
        gp << "set title 'MoE layer " << l << ": no assignments counted'\nunset ytics\nplot [0:1] [0:1] NaN\n"
           << "set ytics\n";
        continue;
      }
      gp << ytics.str() << "set title 'MoE layer " << l << " (specialisation " << std::fixed
         << std::setprecision(3) << v.layers[l].specialization << ")'\nplot " << quote(file.string())
         << " matrix with image\n";
    }
    gp << "unset multiplot\n";
    images.push_back("expert_domain.png");
  }
  write_text(plots / "plots.gp", gp.str());
  run_gnuplot((plots / "plots.gp").string());

  std::ostringstream md;
  md << "# " << in.title << "\n\n| | |\n|---|---|\n";
  for (auto& [k, val] : in.facts) md << "| " << k << " | " << val << " |\n";
  md << "\n## Loss\n\n![loss](plots/loss.png)\n\n";
  if (std::find(images.begin(), images.end(), "load.png") != images.end())
    md << "## Expert load over time\n\nShare of each layer's assignments per expert, on training batches.\n\n"
       << "![load](plots/load.png)\n\n";
  if (std::find(images.begin(), images.end(), "expert_domain.png") != images.end())
    md << "## Expert x genre\n\nP(expert | genre) on the validation set; specialisation = I(genre; expert) / "
          "H(genre).\n\n![expert x genre](plots/expert_domain.png)\n\n";
  if (!in.sample.empty()) md << "## Sample\n\n```\n" << in.sample << "\n```\n";
  const auto path = (dir / "report.md").string();
  write_text(path, md.str());
  return path;
}

}  // namespace moeforge
