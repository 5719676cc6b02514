#!/usr/bin/env bash
# torchrun on one node or on many (c10d rendezvous): the same command on every node.
#
#   launch/torchrun.sh launch/pretrain.py --config configs/g.json                 # this node, all GPUs
#   NNODES=8 HEAD=node01 launch/torchrun.sh launch/pretrain.py --config configs/g.json   # on each node
#
# Exit status: torchrun's, except 75 when the run checkpointed on SIGTERM or its time budget
# (torchrun itself reports that as 1): run the same command again to resume. SIGTERM / SIGINT to
# this script reach the ranks through torchrun, which waits STOP_GRACE_S for their checkpoint.
set -uo pipefail

NNODES=${NNODES:-1}                       # nodes taking part; each runs this same command
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
[ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1   # no GPU: one CPU rank
HEAD=${HEAD:-}                            # rendezvous host (several nodes); any one of them
RDZV_ID=${RDZV_ID:-vmaescale}             # the run's name; the same on every node
# The rendezvous port, derived from RDZV_ID so every node agrees without a fixed 29500.
RDZV_PORT=${RDZV_PORT:-$(( 10000 + $(printf '%s' "$RDZV_ID" | cksum | cut -d' ' -f1) % 20000 ))}
STOP_GRACE_S=${STOP_GRACE_S:-240}         # how long torchrun waits for the checkpoint on a stop
PYTHON=${PYTHON:-python}                  # the interpreter with vmaescale installed (e.g. .venv/bin/python)

if [ "$#" -lt 1 ]; then
    echo "usage: [NNODES=N HEAD=host] launch/torchrun.sh launch/<entry>.py --config CONFIG [...]" >&2
    exit 2
fi
if [ "$NNODES" -gt 1 ] && [ -z "$HEAD" ]; then
    echo "launch/torchrun.sh: NNODES=$NNODES but HEAD is empty; set HEAD to one node's host name" >&2
    exit 2
fi
if [ "$NNODES" -gt 1 ]; then
    rendezvous=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$HEAD:$RDZV_PORT" --rdzv-id "$RDZV_ID")
else
    rendezvous=(--standalone)               # one node: torchrun picks a free port
fi
export VMAESCALE_STATUS_FILE=${VMAESCALE_STATUS_FILE:-$(mktemp -t vmaescale-status.XXXXXX)}
: > "$VMAESCALE_STATUS_FILE"

"$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc-per-node "$NPROC_PER_NODE" \
    --shutdown-timeout "$STOP_GRACE_S" "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
while :; do
    wait "$pid"; rc=$?
    kill -0 "$pid" 2>/dev/null || break     # a trap interrupted wait: wait again
done
if [ "$(cut -d' ' -f1 "$VMAESCALE_STATUS_FILE")" = preempted ]; then rc=75; fi
rm -f "$VMAESCALE_STATUS_FILE"
exit "$rc"
