#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test shadowcdn.
# Idempotent: installs nothing that is already there.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)   # pingora's flate2 builds zlib-ng with cmake
command -v cc >/dev/null 2>&1 || need+=(build-essential)

if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
