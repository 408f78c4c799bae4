#!/usr/bin/env bash
# Installs the Debian data packages the experiments use by default, when possible.
# Never fails the caller: a missing package or no root/apt-get only prints a notice.
set -u
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != "0" ]; then
  echo "install_data: not root or no apt-get; skipping Debian corpora (loaders fall back)."
  exit 0
fi
apt-get update -qq || { echo "install_data: apt-get update failed; skipping."; exit 0; }
pkgs="bible-kjv fortunes dataset-fashion-mnist"
for doc in python3.11-doc python3.13-doc python3.12-doc; do
  if apt-cache show "$doc" >/dev/null 2>&1; then pkgs="$pkgs $doc"; break; fi
done
for p in $pkgs; do
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null 2>&1 \
    && echo "install_data: installed $p" || echo "install_data: could not install $p (skipped)"
done
exit 0
