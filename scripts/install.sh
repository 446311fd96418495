#!/usr/bin/env bash
# Install (or upgrade) ondemand as a systemd service.  Idempotent: run it again to upgrade.
#
#   sudo bash scripts/install.sh              install, enable and start ondemand.service
#   bash scripts/install.sh --dry-run         print what would be done, change nothing
#   bash scripts/install.sh --prefix DIR      stage everything under DIR (packaging, tests):
#                                             no user, no chown, no systemctl
# Options:
#   --no-venv     do not create/update the venv (you manage /opt/ondemand/venv yourself)
#   --no-start    install and enable, but do not start/restart the service
#
# What it does (docs/operations.md):
#   1. system user and group `ondemand` (home /var/lib/ondemand, no shell), added to the
#      `video` / `render` groups that exist (GPU device nodes are often 0660 root:video)
#   2. source copied to /opt/ondemand/src, venv /opt/ondemand/venv via scripts/setup.sh
#      (ONDEMAND_VENV; ONDEMAND_TORCH_SPEC / ONDEMAND_TORCH_INDEX are passed through)
#   3. /etc/ondemand/config.toml from config.toml (storage.dir = /var/lib/ondemand) if absent
#   4. /etc/ondemand/ondemand.env from systemd/ondemand.env.example with a random
#      ONDEMAND_TOKEN, if absent (mode 0640 root:ondemand)
#   5. every unit in systemd/ into /etc/systemd/system; daemon-reload; enable --now
#      ondemand.service; restart it when the code or units changed.  Timers such as
#      ondemand-prewarm.timer are installed but not enabled: holding the GPU on a schedule
#      costs money, so that is your call (`systemctl enable --now ondemand-prewarm.timer`)
# Existing config, env file and state are never overwritten.
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
prefix=/
dry_run=0
do_venv=1
do_start=1
user=ondemand

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --prefix=*) prefix=${1#--prefix=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    --no-venv) do_venv=0; shift ;;
    --no-start) do_start=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
prefix=${prefix%/}
staged=0                                 # staging into a directory: no root-only side effects
[ -n "$prefix" ] && staged=1

opt=$prefix/opt/ondemand
etc=$prefix/etc/ondemand
units=$prefix/etc/systemd/system
state=$prefix/var/lib/ondemand

say() { echo "install: $*"; }
run() {                                  # print, then run unless --dry-run
  echo "+ $*"
  [ "$dry_run" = 1 ] || "$@"
}
root_only() {                            # commands that need root and a real system
  if [ "$staged" = 1 ]; then echo "  (skipped with --prefix) $*"; else run "$@"; fi
}
have_systemd() { [ "$staged" = 0 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

if [ "$staged" = 0 ] && [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo), or use --dry-run / --prefix DIR" >&2
  exit 1
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install.sh: python3 >= 3.11 is required (found: $(python3 --version 2>&1 || echo none))" >&2
  exit 1
fi

# 1. user --------------------------------------------------------------------------------------
if [ "$staged" = 0 ] && id "$user" >/dev/null 2>&1; then
  say "user $user exists"
else
  root_only useradd --system --user-group --home-dir /var/lib/ondemand --no-create-home \
    --shell /usr/sbin/nologin --comment "ondemand daemon" "$user"
fi
for g in video render; do
  if getent group "$g" >/dev/null 2>&1; then root_only usermod -a -G "$g" "$user"; fi
done

# 2. code and venv -----------------------------------------------------------------------------
changed=0
source_files() {                         # NUL-separated: what gets installed (not .gitignored)
  (
    cd "$src"
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git ls-files -z --cached --others --exclude-standard
    else
      find . \( -name .git -o -name '.venv*' -o -name var -o -name __pycache__ \
        -o -name '*.egg-info' -o -name '.*_cache' -o -name .hypothesis \) -prune -o -type f -print0
    fi | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done | LC_ALL=C sort -z
  )
}
new_hash=$(cd "$src" && source_files | xargs -0 -r sha256sum | sha256sum | cut -d' ' -f1)
old_hash=$(cat "$opt/.source-sha256" 2>/dev/null || true)
if [ "$new_hash" = "$old_hash" ]; then
  say "code in $opt/src is up to date"
else
  changed=1
  run mkdir -p "$opt/src"
  echo "+ copy $src -> $opt/src"
  if [ "$dry_run" = 0 ]; then
    source_files | tar -C "$src" --null -T - -cf - | tar -C "$opt/src" -xf -
    echo "$new_hash" > "$opt/.source-sha256"
  fi
fi
if [ "$do_venv" = 1 ]; then
  echo "+ ONDEMAND_VENV=$opt/venv bash $opt/src/scripts/setup.sh"
  [ "$dry_run" = 1 ] || ONDEMAND_VENV="$opt/venv" bash "$opt/src/scripts/setup.sh"
else
  say "--no-venv: leaving $opt/venv alone"
fi

# 3. config ------------------------------------------------------------------------------------
run mkdir -p "$etc"
if [ -e "$etc/config.toml" ]; then
  say "keeping existing $etc/config.toml"
else
  echo "+ write $etc/config.toml (storage.dir = /var/lib/ondemand)"
  if [ "$dry_run" = 0 ]; then
    sed -e '/^\[storage\]/,/^\[/ s|^dir = .*|dir = "/var/lib/ondemand"|' \
      "$src/config.toml" > "$etc/config.toml.tmp"
    grep -q '^dir = "/var/lib/ondemand"' "$etc/config.toml.tmp" \
      || { echo "install.sh: could not set storage.dir in config.toml" >&2; exit 1; }
    chmod 0640 "$etc/config.toml.tmp"
    mv "$etc/config.toml.tmp" "$etc/config.toml"
  fi
  root_only chown "root:$user" "$etc/config.toml"
fi

# 4. environment file with a token -----------------------------------------------------------
if [ -e "$etc/ondemand.env" ]; then
  say "keeping existing $etc/ondemand.env"
else
  echo "+ write $etc/ondemand.env (new random ONDEMAND_TOKEN)"
  if [ "$dry_run" = 0 ]; then
    token=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
    (umask 077; sed "s|^ONDEMAND_TOKEN=.*|ONDEMAND_TOKEN=$token|" \
      "$src/systemd/ondemand.env.example" > "$etc/ondemand.env.tmp")
    chmod 0640 "$etc/ondemand.env.tmp"
    mv "$etc/ondemand.env.tmp" "$etc/ondemand.env"
  fi
  root_only chown "root:$user" "$etc/ondemand.env"
fi

# 5. units -------------------------------------------------------------------------------------
run mkdir -p "$units"
enable=(ondemand.service)
for unit in "$src"/systemd/*.service "$src"/systemd/*.timer "$src"/systemd/*.socket \
            "$src"/systemd/*.path; do
  [ -e "$unit" ] || continue
  name=$(basename "$unit")
  if cmp -s "$unit" "$units/$name"; then
    say "unit $name is up to date"
  else
    changed=1
    run install -m 0644 "$unit" "$units/$name"
  fi
done

if have_systemd; then
  run systemctl daemon-reload
  was_active=$(systemctl is-active ondemand.service 2>/dev/null || true)
  if [ "$do_start" = 1 ]; then
    run systemctl enable --now "${enable[@]}"
    if [ "$was_active" = active ] && [ "$changed" = 1 ]; then
      # graceful: running batch finishes, queued jobs are kept and run after the restart
      run systemctl restart ondemand.service
    fi
  else
    run systemctl enable "${enable[@]}"
  fi
  say "done.  Check: systemctl status ondemand; journalctl -u ondemand -f"
  for t in "$units"/ondemand-*.timer; do
    [ -e "$t" ] && say "optional: systemctl enable --now $(basename "$t")  (docs/prewarm.md)"
  done
  say "       curl -H \"Authorization: Bearer \$(sudo sed -n 's/^ONDEMAND_TOKEN=//p' $etc/ondemand.env)\" http://127.0.0.1:8321/v1/status"
elif [ "$staged" = 1 ]; then
  echo "  (skipped with --prefix) systemctl daemon-reload; systemctl enable --now ${enable[*]}"
  say "staged into $prefix"
else
  say "systemd is not running here: units installed, start it with your init system"
fi
