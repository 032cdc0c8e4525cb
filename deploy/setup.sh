#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test shadowcdn.
# Idempotent: installs nothing that is already there.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)   # pingora's flate2 builds zlib-ng with cmake
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v curl >/dev/null 2>&1 || need+=(curl)     # deploy/local/run.sh's readiness checks
# pip fetches ONNX Runtime below (a fresh Debian has python3, but not its pip).
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import pip' >/dev/null 2>&1 || need+=(python3-pip)
# The training and offline-benchmark scripts make virtualenvs (Debian splits venv out).
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if ((${#need[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
      echo "setup: need ${need[*]}; run as root or install sudo" >&2
      exit 1
    }
    sudo="sudo"
  fi
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  # Through env: sudo's env_reset would drop a plain assignment, and debconf would prompt.
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
rust_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
if [ "${rust_minor:-0}" -lt 95 ] 2>/dev/null; then
  echo "setup: Rust 1.95 or newer is required, found: $(rustc --version)" >&2
  exit 1
fi
# The lockfile's crates need Rust 1.95 (the workspace's rust-version); .ci/run needs rustfmt
# and clippy, which a minimal rustup profile leaves out.
if command -v rustup >/dev/null 2>&1; then
  for c in rustfmt clippy; do
    cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$c"
  done
fi

# ONNX Runtime for the forecaster (ort loads it at run time): the shared library from the
# onnxruntime wheel on PyPI, unpacked into .cache/ (ignored by git). Pinned with ort's api-31.
# Each file is written under a temporary name and renamed into place, so an interrupted run
# (or a full disk) leaves no truncated library for the next run to take as installed.
ORT_VERSION=1.31.1
ORT_DIR="$(cd "$(dirname "$0")/.." && pwd)/.cache/onnxruntime"
if [ ! -f "$ORT_DIR/libonnxruntime.so.$ORT_VERSION" ]; then
  echo "setup: fetching onnxruntime $ORT_VERSION from PyPI" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "onnxruntime==$ORT_VERSION"
  mkdir -p "$ORT_DIR"
  python3 - "$tmp" "$ORT_DIR" "$ORT_VERSION" <<'PY'
import glob, os, sys, zipfile
tmp, out, ver = sys.argv[1:]
wheel = glob.glob(f"{tmp}/onnxruntime-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.endswith(f"libonnxruntime.so.{ver}") or name.endswith("libonnxruntime_providers_shared.so"):
            final = f"{out}/{name.rsplit('/', 1)[1]}"
            with z.open(name) as src, open(final + ".part", "wb") as dst:
                dst.write(src.read())
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(final + ".part", final)
PY
  rm -rf "$tmp"
  [ -f "$ORT_DIR/libonnxruntime.so.$ORT_VERSION" ] || {
    echo "setup: the onnxruntime $ORT_VERSION wheel holds no libonnxruntime.so.$ORT_VERSION" >&2
    exit 1
  }
fi
