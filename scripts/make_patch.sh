#!/usr/bin/env bash
# Regenerate a patch from edits made in build/src (developer helper); its header is kept.
#   scripts/make_patch.sh patches/llama.cpp/0001-x.patch src/llama-arch.h src/llama-arch.cpp ...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$1; shift
ver=$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' "$root/pyproject.toml")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
ln -s "$root/build/dl/llama_cpp_python-$ver/vendor/llama.cpp" "$tmp/a"
ln -s "$root/build/src" "$tmp/b"
cd "$tmp"
# keep the patch's header (its commit message and trailers, above the first diff)
if [ -f "$root/$out" ]; then sed '/^diff --git /,$d' "$root/$out" > "$tmp/header"; else : > "$tmp/header"; fi
cp "$tmp/header" "$root/$out"
for f in "$@"; do git diff --no-index --src-prefix= --dst-prefix= "a/$f" "b/$f" >> "$root/$out" || true; done
echo "wrote $out"
