#!/usr/bin/env bash
# Idempotent set-up of the peer for `flock bench --peer litellm`: a LiteLLM proxy in its own virtualenv
# (.venv-litellm; litellm[proxy] pins uvicorn, websockets and python-multipart versions that conflict with
# flock's, so it cannot share .venv) and the wrk load generator. Skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLOCK_PEER_LITELLM_VENV:-.venv-litellm}
PIN="litellm[proxy]==1.80.0"
say() { printf '\033[1m[peer-litellm]\033[0m %s\n' "$*"; }
source scripts/apt_missing.sh

if [[ "$(cat "$VENV/.flock-peer" 2>/dev/null)" != "$PIN" ]]; then
  say "creating $VENV with $PIN (about a minute)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q "$PIN"
  echo "$PIN" > "$VENV/.flock-peer"
else
  say "$VENV is up to date ($PIN)"
fi

apt_missing wrk wrk ", the bench's load generator" "install it (apt-get install wrk, brew install wrk)"
say "ready: flock bench --peer litellm"
