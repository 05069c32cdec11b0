#!/usr/bin/env bash
# README command 1's data step under the pips users have: the embedded mixture's archives
# are fetched and verified (hbo_jax.data.fetch) by a fresh venv's interpreter, reading that
# venv's pip configuration, for the pip bundled with Python 3.11, the latest pip on 3.11
# (pip 26.3 broke the old `pip download` path), and the pip bundled with Python 3.13.
# The fetch module needs only the standard library, so the venvs install nothing else.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
find_python() {  # python3.X on PATH, else a pyenv install of it (CI's machines have 3.11-3.13)
  if "python$1" --version >/dev/null 2>&1; then command -v "python$1"; return; fi
  local root; root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  ls "$root"/versions/"$1".*/bin/"python$1" 2>/dev/null | sort -V | tail -n 1
}
n=0
for spec in "3.11 bundled" "3.11 latest" "3.13 bundled"; do
  set -- $spec
  py="$(find_python "$1")"
  [ -n "$py" ] || { echo "check_fetch_pips: python$1 not found" >&2; exit 1; }
  "$py" -m venv "$work/venv$n"
  if [ "$2" = latest ]; then "$work/venv$n/bin/python" -m pip install -q -U pip; fi
  echo "== $("$work/venv$n/bin/python" --version), $("$work/venv$n/bin/python" -m pip --version | cut -d' ' -f1-2)"
  PYTHONPATH="$repo" "$work/venv$n/bin/python" -m hbo_jax.data.fetch --dest "$work/archives$n"
  n=$((n + 1))
done
echo "check_fetch_pips: the archives were fetched and verified under all $n pips"
