#!/usr/bin/env bash
# Set up cosyapp on a fresh Debian/Ubuntu machine. Idempotent: rerunning it only fills in what is missing.
#
#   scripts/setup.sh           system packages, .venv (torch 2.11.0) with cosyapp[client,dev,hub,textnorm,cluster]
#   scripts/setup.sh --serve   the same, then start the service on port 50000 in the foreground, on the real
#                              CosyVoice2-0.5B when it is present or can be downloaded, else on a tiny
#                              RANDOM model (it speaks noise; the script says so loudly)
#
# Environment:
#   PYTHON            interpreter for the venv (default: python3; 3.10 or newer)
#   TORCH_INDEX_URL   a package index to take the torch wheels from (default: pip's configured index)
#   COSYAPP_NO_DOWNLOAD=1   with --serve: do not try to download the real model
# Installing system packages needs root or passwordless sudo; without them it warns and goes on.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
SERVE=0
for arg in "$@"; do
  case "$arg" in
    --serve) SERVE=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '\n==> %s\n' "$*"; }

# ---- system packages ------------------------------------------------------------------------------
# python3-venv/-dev + build-essential: the venv and building PyAudio; portaudio19-dev: PyAudio's PortAudio;
# libsndfile1: audio decoding; curl: the README's examples and the service tests; systemd: systemd-analyze
# (checks the unit); ca-certificates: downloads; libtcmalloc-minimal4: the service's memory allocator (allocator.py);
# chromium + chromium-driver: the headless browser the playground's test drives with selenium.
# redis-server: the shared store of a cluster (`serve --ray`), which the cluster tests start on a free port.
APT_PACKAGES=(python3 python3-venv python3-dev build-essential portaudio19-dev libsndfile1 curl systemd ca-certificates
              libtcmalloc-minimal4 chromium chromium-driver redis-server)
missing=()
if command -v dpkg-query >/dev/null; then
  for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  as_root=""
  if [[ $EUID -eq 0 ]]; then as_root="env"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then as_root="sudo env"
  fi
  if [[ -n "$as_root" ]]; then
    say "installing system packages: ${missing[*]}"
    $as_root DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $as_root DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "WARNING: missing system packages (${missing[*]}) and no root/sudo to install them;" \
         "PyAudio or some tests may not work" >&2
  fi
fi

# ---- virtual environment --------------------------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "cosyapp needs Python 3.10 or newer; $PYTHON is $("$PYTHON" -V 2>&1). Set PYTHON=/path/to/python3.x" >&2
  exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv with $("$PYTHON" -V)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

if ! .venv/bin/python -c 'import torch, torchaudio, sys; sys.exit(not (torch.__version__.startswith("2.11.0") and torchaudio.__version__.startswith("2.11.0")))' 2>/dev/null; then
  say "installing torch 2.11.0 + torchaudio 2.11.0${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
  "${PIP[@]}" torch==2.11.0 torchaudio==2.11.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
say "installing cosyapp (editable) with the client, dev, hub, textnorm and cluster extras"
"${PIP[@]}" -e ".[client,dev,hub,textnorm,cluster]"
# The wetext text frontend reads the TN grammars (FST files) shipped in WeTextProcessing; its own
# dependency (pynini, for building grammars) is not needed to read them.
"${PIP[@]}" --no-deps wetextprocessing==1.2.0
echo "setup done: $(.venv/bin/cosyapp --version), tests: .venv/bin/python -m pytest -q tests"

[[ $SERVE -eq 1 ]] || exit 0

# ---- start the service ----------------------------------------------------------------------------
MODEL_DIR="$(.venv/bin/python -c 'from cosyapp.config import load_settings; print(load_settings().model.model_dir)')"
has_model() { [[ -f "$1/cosyvoice2.yaml" && -f "$1/llm.pt" && -f "$1/flow.pt" && -f "$1/hift.pt" ]]; }
if ! has_model "$MODEL_DIR" && [[ "${COSYAPP_NO_DOWNLOAD:-0}" != 1 ]]; then
  say "no model in $MODEL_DIR: downloading CosyVoice2-0.5B (about 2.6 GB)"
  .venv/bin/cosyapp models pull cosyvoice2 || echo "download failed" >&2
fi
if has_model "$MODEL_DIR"; then
  say "starting the service on the real model in $MODEL_DIR (Ctrl+C stops it)"
  exec .venv/bin/cosyapp serve
fi
TINY_DIR="$ROOT/pretrained_models/tiny-cosyvoice2"
has_model "$TINY_DIR" || .venv/bin/cosyapp models make-tiny "$TINY_DIR"
cat >&2 <<BANNER

  ##########################################################################################
  #  NOTE: the real CosyVoice2-0.5B model is not in $MODEL_DIR and could not be downloaded.
  #  Serving the TINY RANDOM-WEIGHT test model from $TINY_DIR instead:
  #  the API works exactly like the real one, but the audio is NOISE.
  #  Get the real model with: .venv/bin/cosyapp models pull cosyvoice2   (see README, "Models")
  ##########################################################################################

BANNER
exec .venv/bin/cosyapp serve --model-dir "$TINY_DIR"
