#!/usr/bin/env bash
# Builds moeforge's Python package against Debian's torch and installs it into a venv over Debian's
# python3-torch (docs/python.md): `make python` and the python_package CTest fixture run it.
#
#   scripts/build-python.sh [BUILD_DIR] [VENV_DIR]     # defaults: build, .venv
# The C++ library must be built in BUILD_DIR first (make build). Idempotent: the wheel is rebuilt only when
# the bindings, the package or the library changed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-$here/build}" && pwd)
venv=${2:-$here/.venv}
case $venv in /*) ;; *) venv=$PWD/$venv ;; esac
[ -f "$build/libmoeforge.a" ] || { echo "build-python: no $build/libmoeforge.a (run make build first)" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  # Debian's Python with its python3-torch, never another python3 that may come first on PATH.
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp=$build/python-wheel/.stamp
newest=$(find "$here/python/src" "$here/python/moeforge" "$here/python/setup.py" "$build/libmoeforge.a" \
  "$build/libmoeforge_kernels_cpu.a" "$build/libmoeforge_spm.so" -type f -newer "$stamp" 2>/dev/null | head -n1 || true)
if [ -f "$stamp" ] && [ -z "$newest" ] && "$venv/bin/python" -c "import moeforge" 2>/dev/null; then
  echo "build-python: moeforge is up to date in $venv"
  exit 0
fi
cp "$build/libmoeforge_spm.so" "$here/python/moeforge/"
rm -rf "$build/python-wheel" "$here/python/build" "$here/python/moeforge.egg-info"
mkdir -p "$build/python-wheel"
(cd "$here/python" && MOEFORGE_BUILD="$build" MAX_JOBS="$(nproc)" \
  "$venv/bin/pip" wheel --quiet --no-deps --no-build-isolation --no-index -w "$build/python-wheel" .)
"$venv/bin/pip" install --quiet --no-deps --no-index --force-reinstall "$build"/python-wheel/moeforge-*.whl
rm -rf "$here/python/build" "$here/python/moeforge.egg-info"
# moeforge's thread environment (docs/python.md, "Speed"; the CLI sets it for itself, docs/performance.md):
# OpenMP and OpenBLAS threads that wait passively, set before torch loads (a .pth line runs at interpreter
# start), for every Python of this venv unless the environment already says otherwise.
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo 'import os; os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE"); os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")' \
  >"$site/moeforge_threads.pth"
touch "$stamp"
"$venv/bin/python" -c "import moeforge; print('build-python: moeforge installed in $venv')"
