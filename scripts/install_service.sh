#!/usr/bin/env bash
# Install cosyapp as the systemd service `stream_service` (runs `cosyapp serve` as a dedicated user).
#
#   sudo scripts/install_service.sh [--app-dir DIR] [--no-start]
#   scripts/install_service.sh --print-unit [--app-dir DIR]     # only print the unit it would install
#
# DIR is the cosyapp checkout with its .venv (default: this checkout). The service user must be able to
# read it: /opt/cosyapp is the usual place (home folders are often private). Afterwards:
#   systemctl status stream_service      journalctl -u stream_service -f
#   edit /etc/stream_service.env (COSYAPP_* settings), then systemctl restart stream_service
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APP_DIR="$ROOT"
PRINT_ONLY=0
START=1
SERVICE_USER=stream_service
UNIT_PATH=/etc/systemd/system/stream_service.service
ENV_PATH=/etc/stream_service.env

while [[ $# -gt 0 ]]; do
  case "$1" in
    --app-dir) APP_DIR="$(cd "$2" && pwd)"; shift 2 ;;
    --print-unit) PRINT_ONLY=1; shift ;;
    --no-start) START=0; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

render_unit() {
  # The unit in git is written for /opt/cosyapp; point it at the actual install folder.
  sed -e "s#/opt/cosyapp#${APP_DIR}#g" "$ROOT/systemd/stream_service.service"
}

if [[ $PRINT_ONLY -eq 1 ]]; then
  render_unit
  exit 0
fi

if [[ $EUID -ne 0 ]]; then
  echo "install_service.sh must run as root (sudo $0 $*)" >&2
  exit 1
fi
if [[ ! -x "$APP_DIR/.venv/bin/cosyapp" ]]; then
  echo "$APP_DIR/.venv/bin/cosyapp not found: run scripts/setup.sh in $APP_DIR first" >&2
  exit 1
fi

if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
  useradd --system --user-group --home-dir /var/lib/stream_service --no-create-home \
    --shell /usr/sbin/nologin "$SERVICE_USER"
  echo "created system user $SERVICE_USER"
fi
# GPU device nodes belong to these groups on distributions that restrict them.
for group in video render; do
  if getent group "$group" >/dev/null; then usermod -aG "$group" "$SERVICE_USER"; fi
done
if ! runuser -u "$SERVICE_USER" -- test -r "$APP_DIR/config.toml" -a -x "$APP_DIR/.venv/bin/cosyapp"; then
  echo "WARNING: user $SERVICE_USER cannot read $APP_DIR; move the checkout to /opt/cosyapp (and rerun" \
       "scripts/setup.sh there) or open up the folder's permissions" >&2
fi

unit_dir="$(mktemp -d)"
trap 'rm -rf "$unit_dir"' EXIT
render_unit >"$unit_dir/stream_service.service"
if command -v systemd-analyze >/dev/null; then
  systemd-analyze verify "$unit_dir/stream_service.service"
fi
install -m 0644 "$unit_dir/stream_service.service" "$UNIT_PATH"
if [[ ! -f "$ENV_PATH" ]]; then
  install -m 0640 -o root -g "$SERVICE_USER" "$ROOT/systemd/stream_service.env" "$ENV_PATH"
  echo "installed $ENV_PATH (edit it to point at your model)"
fi

systemctl daemon-reload
systemctl enable stream_service
echo "installed $UNIT_PATH for $APP_DIR"
if [[ $START -eq 1 ]]; then
  systemctl restart stream_service
  systemctl --no-pager --lines=5 status stream_service || true
  echo "follow the log with: journalctl -u stream_service -f"
fi
