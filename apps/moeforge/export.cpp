// moeforge export and import: GGUF for llama.cpp and Hugging Face folders (docs/interop.md).
#include <iostream>

#include "command.h"
#include "moeforge/interop/export.h"
#include "moeforge/interop/hf.h"

namespace moeforge::cli {

Command add_export(CLI::App& app, const Globals& /*g*/) {
  struct Args {
    ExportOptions options;
    int64_t shard_mb = 0;
  };
  auto a = std::make_shared<Args>();
  auto* c = app.add_subcommand("export", "write a checkpoint as GGUF (llama.cpp) or a Hugging Face folder");
  c->add_option("--checkpoint", a->options.checkpoint, "checkpoint folder")->required();
  c->add_option("--format", a->options.format, "gguf or hf")->required();
  c->add_option("--out", a->options.out, "the GGUF file, or the Hugging Face folder")->required();
  c->add_option("--dtype", a->options.dtype, "weights: f32, f16 or bf16 (gguf also q8_0; default f32)");
  c->add_option("--shard-mb", a->shard_mb, "hf: shard the weights above this many MiB (default 4096)")
      ->check(CLI::PositiveNumber);
  return {c, [a] {
            a->options.max_shard_bytes = uint64_t(a->shard_mb) << 20;
            export_checkpoint(a->options, std::cout);
            return 0;
          }};
}

Command add_import(CLI::App& app, const Globals& /*g*/) {
  struct Args {
    std::string format, from, out;
  };
  auto a = std::make_shared<Args>();
  auto* c = app.add_subcommand("import", "read a Hugging Face Llama or Mixtral folder into a checkpoint");
  c->add_option("--format", a->format, "hf")->required()->check(CLI::IsMember({"hf"}));
  c->add_option("--from", a->from, "the Hugging Face folder")->required();
  c->add_option("--out", a->out, "the new checkpoint folder")->required();
  return {c, [a] {
            import_hf(a->from, a->out, std::cout);
            return 0;
          }};
}

}  // namespace moeforge::cli
