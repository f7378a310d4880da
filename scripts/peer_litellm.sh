#!/usr/bin/env bash
# Idempotent set-up of the peer for `flock bench --peer litellm`: a LiteLLM proxy in its own virtualenv
# (.venv-litellm; litellm[proxy] pins uvicorn, websockets and python-multipart versions that conflict with
# flock's, so it cannot share .venv) and the wrk load generator. Skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLOCK_PEER_LITELLM_VENV:-.venv-litellm}
PIN="litellm[proxy]==1.80.0"
say() { printf '\033[1m[peer-litellm]\033[0m %s\n' "$*"; }

if [[ "$(cat "$VENV/.flock-peer" 2>/dev/null)" != "$PIN" ]]; then
  say "creating $VENV with $PIN (about a minute)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q "$PIN"
  echo "$PIN" > "$VENV/.flock-peer"
else
  say "$VENV is up to date ($PIN)"
fi

if ! command -v wrk >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "installing wrk (apt-get), the bench's load generator"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else
    say "WARNING: wrk is missing and this is not root: install it (apt-get install wrk, brew install wrk)"
  fi
fi
say "ready: flock bench --peer litellm"
