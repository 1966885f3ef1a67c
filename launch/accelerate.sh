#!/usr/bin/env bash
# Launch `python -m dist_infonce.train` under `accelerate launch` with this
# repository's config files (launch/accelerate_cpu.yaml, launch/accelerate_gpu.yaml).
#
# Usage:
#   launch/accelerate.sh [options] [--] [--config PATH] [key=value ...]
#
# Options (each also read from the environment variable in brackets):
#   --cpu | --gpu        device type; default: --gpu when nvidia-smi lists a GPU
#   --nproc N            processes per machine [NPROC_PER_NODE]; default: the
#                        number of GPUs, or 2 on CPU
#   --nnodes N           machines [NNODES]; default 1
#   --node-rank R        this machine's rank [NODE_RANK]; default 0
#   --master-addr HOST   machine 0's address [MASTER_ADDR] (needed for nnodes > 1)
#   --master-port PORT   its port [MASTER_PORT]; default: the config file's
#
# Why a wrapper: on CPU, accelerate 1.15 runs N connected gloo processes only with
# ACCELERATE_USE_CPU=true in the environment plus the MULTI_GPU launcher
# (accelerate_cpu.yaml explains); `accelerate launch --cpu --num_processes 2`
# silently runs one process. The wrapper also turns "per machine" into the
# total that --num_processes means.
# The python that runs accelerate is $PYTHON (default: python3 on PATH).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  # Print the comment block at the top of this file (everything before `set`).
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

gpus=0
if command -v nvidia-smi > /dev/null 2>&1; then
  gpus="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"
fi
device=cpu
((gpus == 0)) || device=gpu
nproc="${NPROC_PER_NODE:-}"
nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-0}"
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-}"
python="${PYTHON:-python3}"

# Our options first; the first unknown argument (or `--`) starts the trainer's.
while (($# > 0)); do
  case "$1" in
    --cpu) device=cpu; shift ;;
    --gpu) device=gpu; shift ;;
    --nproc | --nproc_per_node | --nproc-per-node) nproc="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank | --node_rank) node_rank="$2"; shift 2 ;;
    --master-addr | --master_addr) master_addr="$2"; shift 2 ;;
    --master-port | --master_port) master_port="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if [[ "$device" == cpu ]]; then
  # The one setting that makes the MULTI_GPU launcher give connected gloo processes.
  export ACCELERATE_USE_CPU=true
  [[ -n "$nproc" ]] || nproc=2
else
  [[ -n "$nproc" ]] || nproc="$gpus"
fi
if ((nproc < 2 && nnodes == 1)); then
  # accelerate's MULTI_GPU launcher refuses fewer than 2 processes; one process
  # needs no launcher at all.
  echo "+ $python -m dist_infonce.train $*" >&2
  exec "$python" -m dist_infonce.train "$@"
fi

cmd=("$python" -m accelerate.commands.launch
  --config_file "$here/accelerate_$device.yaml"
  --num_machines "$nnodes" --machine_rank "$node_rank"
  --num_processes "$((nproc * nnodes))")
if ((nnodes > 1)); then
  if [[ -z "$master_addr" ]]; then
    echo "launch/accelerate.sh: --nnodes $nnodes needs --master-addr (or MASTER_ADDR)" >&2
    exit 2
  fi
  cmd+=(--main_process_ip "$master_addr")
fi
[[ -z "$master_port" ]] || cmd+=(--main_process_port "$master_port")
cmd+=(-m dist_infonce.train "$@")

echo "+ ${cmd[*]}" >&2
# exec: signals reach accelerate (and through torchrun the workers) directly.
exec "${cmd[@]}"
