#!/usr/bin/env bash
# Remove the ondemand service.  Keeps jobs, results, cost ledger, models, config and token
# unless --purge.
#
#   sudo bash scripts/uninstall.sh            stop (graceful drain), disable, remove units and
#                                             /opt/ondemand; keep /var/lib, /var/cache, /etc data
#   sudo bash scripts/uninstall.sh --purge    also remove /var/lib/ondemand, /var/cache/ondemand,
#                                             /etc/ondemand and the `ondemand` user
#   bash scripts/uninstall.sh --dry-run       print what would be done
#   bash scripts/uninstall.sh --prefix DIR    act on a tree staged by install.sh --prefix DIR
set -euo pipefail

prefix=/
dry_run=0
purge=0
user=ondemand
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --prefix=*) prefix=${1#--prefix=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
prefix=${prefix%/}
staged=0
[ -n "$prefix" ] && staged=1
units=$prefix/etc/systemd/system

say() { echo "uninstall: $*"; }
run() { echo "+ $*"; [ "$dry_run" = 1 ] || "$@"; }
root_only() { if [ "$staged" = 1 ]; then echo "  (skipped with --prefix) $*"; else run "$@"; fi; }

if [ "$staged" = 0 ] && [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "uninstall.sh: run as root (sudo), or use --dry-run / --prefix DIR" >&2
  exit 1
fi

names=()
for f in "$units"/ondemand.service "$units"/ondemand-*; do
  [ -e "$f" ] && names+=("$(basename "$f")")
done
if [ "${#names[@]}" -gt 0 ]; then
  if [ "$staged" = 0 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    # stop waits for the graceful drain (TimeoutStopSec); queued jobs stay in /var/lib/ondemand
    run systemctl disable --now "${names[@]}"
  else
    echo "  (skipped) systemctl disable --now ${names[*]}"
  fi
  for n in "${names[@]}"; do run rm -f "$units/$n"; done
  if [ "$staged" = 0 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    run systemctl daemon-reload
  fi
else
  say "no ondemand units in $units"
fi

run rm -rf "$prefix/opt/ondemand"

if [ "$purge" = 1 ]; then
  run rm -rf "$prefix/var/lib/ondemand" "$prefix/var/cache/ondemand" "$prefix/etc/ondemand"
  if [ "$staged" = 0 ] && id "$user" >/dev/null 2>&1; then
    root_only userdel "$user"
  fi
  say "purged"
else
  say "kept $prefix/var/lib/ondemand (jobs, results, ledger), $prefix/var/cache/ondemand (models)"
  say "and $prefix/etc/ondemand (config, token); --purge removes them"
fi
