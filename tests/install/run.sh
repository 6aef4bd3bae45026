#!/usr/bin/env bash
# `cmake --install` checked the way a user meets it (docs/interop.md, "moeforge as a library"):
#  1. install the build tree into a fresh prefix;
#  2. build tests/install/consumer against it with find_package(moeforge) and run it: it tokenises, so the
#     SentencePiece module must be found from the installed package;
#  3. move the whole prefix elsewhere and check that its CLI finds its own module (relative to the binary,
#     not the build tree's or the old prefix's) and trains a tiny model, which tokenises.
# Usage: run.sh BUILD_DIR WORK_DIR
set -euo pipefail
build=$1
work=$2
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$work"
mkdir -p "$work"
prefix=$work/prefix
cmake --install "$build" --prefix "$prefix" >"$work/install.log"
for f in bin/moeforge lib/libmoeforge.a lib/moeforge/libmoeforge_spm.so lib/cmake/moeforge/moeforgeConfig.cmake \
  include/moeforge/layer/moe_layer.h; do
  [ -e "$prefix/$f" ] || { echo "install: $prefix/$f is missing" >&2; exit 1; }
done

cmake -S "$here/consumer" -B "$work/consumer" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  >"$work/consumer-configure.log" 2>&1 || { cat "$work/consumer-configure.log" >&2; exit 1; }
cmake --build "$work/consumer" -j "${JOBS:-2}" >"$work/consumer-build.log" 2>&1 ||
  { cat "$work/consumer-build.log" >&2; exit 1; }
out=$(env -u MOEFORGE_SPM_SHIM "$work/consumer/consumer")
echo "$out"
# A program outside the prefix finds the module through the prefix it was installed to.
echo "$out" | grep -qx "tokenizer module: $prefix/lib/moeforge/libmoeforge_spm.so" ||
  { echo "consumer loaded the tokenizer module from elsewhere" >&2; exit 1; }

moved=$work/moved
mv "$prefix" "$moved"
info=$(env -u MOEFORGE_SPM_SHIM "$moved/bin/moeforge" info)
echo "$info" | grep "tokenizer module"
echo "$info" | grep -qx "tokenizer module: $moved/lib/moeforge/libmoeforge_spm.so" ||
  { echo "the moved CLI did not load its own tokenizer module" >&2; exit 1; }
corpus=$work/corpus
for d in alpha beta; do
  mkdir -p "$corpus/$d"
  for f in 1 2 3 4; do
    for i in $(seq 1 60); do echo "a moved binary in $d still tokenises sentence $i of document $f."; done \
      >"$corpus/$d/doc$f.txt"
  done
done
env -u MOEFORGE_SPM_SHIM "$moved/bin/moeforge" train --no-report --out "$work/run" \
  --set model.d_model=32 --set model.n_layer=2 --set model.n_head=2 --set model.d_ff=48 --set moe.n_expert=4 \
  --set moe.d_expert=24 --set moe.router='"topk"' --set train.steps=3 --set train.batch_size=2 \
  --set train.eval_every=0 --set train.eval_batches=1 --set train.threads=1 --set data.corpus="\"text:$corpus\"" \
  --set data.dir="\"$work/data\"" --set data.vocab_size=128 --set data.byte_fallback=false --set data.seq_len=16 \
  --set data.heldout_genres='[]' >"$work/train.log" 2>&1 || { cat "$work/train.log" >&2; exit 1; }
echo "moved CLI trained 3 steps"
