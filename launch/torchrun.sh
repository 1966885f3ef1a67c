#!/usr/bin/env bash
# Launch `python -m dist_infonce.train` under torchrun, on one node or many.
#
# Usage:
#   launch/torchrun.sh [options] [--] [--config PATH] [key=value ...]
#
# Options (each also read from the environment variable in brackets):
#   --nproc N            processes per node [NPROC_PER_NODE]; default: the number
#                        of GPUs nvidia-smi lists, or 1 without GPUs
#   --nnodes N           number of nodes [NNODES]; default 1
#   --node-rank R        this node's rank, 0..nnodes-1 [NODE_RANK]; used by the
#                        static rendezvous (c10d assigns ranks itself)
#   --master-addr HOST   rendezvous host, usually node 0 [MASTER_ADDR]
#   --master-port PORT   rendezvous port [MASTER_PORT]; default 29500
#   --rdzv-backend B     c10d (default, elastic) or static [RDZV_BACKEND]
#   --rdzv-id ID         job id shared by all nodes [RDZV_ID]; default dist_infonce
#
# One node with no --master-addr uses `torchrun --standalone`, which picks a free
# port, so two runs on one machine do not collide. Several nodes run the same
# command on every node with the same --master-addr/--master-port/--rdzv-id.
# The python that runs torchrun is $PYTHON (default: python3 on PATH), so an
# activated virtual environment is used.
#
# Examples:
#   launch/torchrun.sh --nproc 2 --config configs/default.yaml train.steps=100
#   # on each of 2 nodes:
#   NNODES=2 MASTER_ADDR=node0 MASTER_PORT=29400 launch/torchrun.sh --nproc 8 -- train.lr=0.6
set -euo pipefail

usage() {
  # Print the comment block at the top of this file (everything before `set`).
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

nproc="${NPROC_PER_NODE:-}"
nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-}"
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-29500}"
rdzv_backend="${RDZV_BACKEND:-c10d}"
rdzv_id="${RDZV_ID:-dist_infonce}"
python="${PYTHON:-python3}"

# Our options come first; the first argument we do not know (or `--`) starts the
# trainer's arguments, which are passed through untouched.
while (($# > 0)); do
  case "$1" in
    --nproc | --nproc_per_node | --nproc-per-node) nproc="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank | --node_rank) node_rank="$2"; shift 2 ;;
    --master-addr | --master_addr) master_addr="$2"; shift 2 ;;
    --master-port | --master_port) master_port="$2"; shift 2 ;;
    --rdzv-backend | --rdzv_backend) rdzv_backend="$2"; shift 2 ;;
    --rdzv-id | --rdzv_id) rdzv_id="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if [[ -z "$nproc" ]]; then
  # One process per GPU; a CPU-only node gets one process (gloo) unless told more.
  nproc=0
  if command -v nvidia-smi > /dev/null 2>&1; then
    nproc="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"
  fi
  ((nproc > 0)) || nproc=1
fi

cmd=("$python" -m torch.distributed.run --nproc_per_node="$nproc")
if ((nnodes == 1)) && [[ -z "$master_addr" ]]; then
  cmd+=(--standalone)
elif [[ -z "$master_addr" ]]; then
  echo "launch/torchrun.sh: --nnodes $nnodes needs --master-addr (or MASTER_ADDR)" >&2
  exit 2
elif [[ "$rdzv_backend" == static ]]; then
  # Static rendezvous: every node must know its own rank.
  if [[ -z "$node_rank" ]]; then
    echo "launch/torchrun.sh: the static rendezvous needs --node-rank (or NODE_RANK)" >&2
    exit 2
  fi
  cmd+=(--nnodes="$nnodes" --node_rank="$node_rank"
    --master_addr="$master_addr" --master_port="$master_port")
else
  cmd+=(--nnodes="$nnodes" --rdzv_backend="$rdzv_backend"
    --rdzv_endpoint="$master_addr:$master_port" --rdzv_id="$rdzv_id")
fi
cmd+=(-m dist_infonce.train "$@")

# torch >= 2.5 shares the rendezvous TCPStore with the workers by default, and a
# restarted worker group (--max-restarts) can then read the previous attempt's
# addresses and hang or fail to connect (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
echo "+ ${cmd[*]}" >&2
# exec: signals sent to this script (Slurm's, a Ctrl-C) reach torchrun directly,
# which forwards them to the workers.
exec "${cmd[@]}"
