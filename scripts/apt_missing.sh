# Sourced by scripts/setup.sh and scripts/peer_litellm.sh (after they define `say`).
# apt_missing COMMAND PACKAGE WHY IF_NOT_ROOT: install PACKAGE with apt-get when COMMAND is missing and this is
# root on a Debian-like system; otherwise say IF_NOT_ROOT as a warning. Nothing when COMMAND exists.
apt_missing() {
  local cmd=$1 pkg=$2 why=$3 otherwise=$4
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "installing $pkg (apt-get)$why"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
  else
    say "WARNING: $cmd is missing and this is not root: $otherwise"
  fi
}
