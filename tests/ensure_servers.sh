#!/usr/bin/env bash
# Make sure the servers the test suite starts are installed, so that `make test` runs every test:
# Prometheus (`prometheus`, `promtool`) and Alertmanager (`prometheus-alertmanager` or upstream's
# `alertmanager`, and `amtool`), and the headless browser that opens `hooktrace report --html`
# (`chromium`, or `chromium-browser`). `make test` runs this first.
#
# Missing ones are installed from Debian's packages when this can (root, or passwordless sudo);
# otherwise it prints one line naming what to install and exits 1.
#
#   tests/ensure_servers.sh [--dry-run]
#   --dry-run            print the commands that would install them, run nothing
#   SERVERS_LOOKUP_PATH  where to look for the binaries, ':'-separated (default: $PATH, then
#                        /usr/bin: where tests/servers.py looks)
set -euo pipefail

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *)
    echo "usage: $0 [--dry-run]" >&2
    exit 2
    ;;
esac
lookup=${SERVERS_LOOKUP_PATH-$PATH:/usr/bin}

found() { # found NAME...: is one of the NAMEs an executable file in a directory of $lookup?
  local name dir
  local -a dirs
  IFS=: read -r -a dirs <<<"$lookup"
  for name in "$@"; do
    for dir in "${dirs[@]}"; do
      [[ -n $dir && -f $dir/$name && -x $dir/$name ]] && return 0
    done
  done
  return 1
}

check() { # sets `missing` to the Debian packages whose binaries are not found
  missing=()
  { found prometheus && found promtool; } || missing+=(prometheus)
  { found prometheus-alertmanager alertmanager && found amtool; } || missing+=(prometheus-alertmanager)
  found chromium chromium-browser || missing+=(chromium)
}
check
((${#missing[@]})) || exit 0

names=${missing[0]} # "a", "a and b", "a, b and c"
for ((i = 1; i < ${#missing[@]}; i++)); do
  if ((i == ${#missing[@]} - 1)); then names+=" and ${missing[i]}"; else names+=", ${missing[i]}"; fi
done
servers=0
browser=0
for package in "${missing[@]}"; do
  if [[ $package == chromium ]]; then browser=1; else servers=1; fi
done
fail() {
  if command -v apt-get >/dev/null 2>&1; then
    echo "make test needs $names: sudo apt-get install ${missing[*]}" >&2
  else
    local how="" chromium="install Chromium and put chromium on PATH"
    if ((servers)); then
      how="install Prometheus and Alertmanager (https://prometheus.io/download/) and put prometheus, promtool,"
      how+=" alertmanager and amtool on PATH"
      ((browser)) && how+="; $chromium"
    else
      how=$chromium
    fi
    echo "make test needs $names: $how" >&2
  fi
  exit 1
}

if [[ $(id -u) == 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
  sudo=(sudo -n)
else
  fail
fi
command -v apt-get >/dev/null 2>&1 || fail

run() {
  if ((dry_run)); then
    echo "$*"
  else
    "$@"
  fi
}
if ((servers && browser)); then
  why="the Prometheus, Alertmanager and HTML report tests run them"
elif ((browser)); then
  why="the HTML report tests open reports in it"
else
  why="the Prometheus and Alertmanager tests run them"
fi
echo "make test: installing ${missing[*]} ($why)" >&2
run "${sudo[@]}" apt-get update -qq || fail
run "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
  fail
((dry_run)) && exit 0
check
if ((${#missing[@]})); then
  echo "make test: apt-get installed ${missing[*]}, but its binaries are still not on PATH or in /usr/bin" >&2
  exit 1
fi
