# Shared body of launch/slurm/*.sbatch (sourced; not a job script of its own).
#
# The batch script sets the cluster values at its top (LAUNCH_FORM, GPUS_PER_NODE, MODULES,
# VENV, CONTAINER_IMAGE, CONTAINER_MOUNTS, STOP_GRACE_S, VMAESCALE_HOME) and then calls
#   run_step  launch/pretrain.py --config CONFIG [--set ...]     (one training job step)
#   setup_job; run_batch python launch/progressive.py ...      (a process in the batch shell
#                                                                that starts its own steps)
# Pre-emption: sbatch's --signal=B:USR1@N (or `scancel --signal=USR1 --batch`) and SIGTERM reach
# this shell; the trap passes the stop request to every job step (SIGUSR1 to srun tasks, SIGTERM
# to torchrun agents, which forward it to their workers); the ranks finish their step,
# checkpoint and exit 75; the shell then requeues the job (`scontrol requeue`) and the next
# start resumes from the checkpoint, in the same MLflow run.

EXIT_REQUEUE=75

setup_job() {
    cd "$VMAESCALE_HOME" || exit 2
    if [ -n "$MODULES" ]; then module load $MODULES || exit 2; fi
    if [ -n "$VENV" ]; then source "$VENV/bin/activate" || exit 2; fi
    eval "$(python -m vmaescale.cluster)" || exit 2     # MASTER_ADDR, MASTER_PORT from the job id
    export VMAESCALE_STATUS_FILE="${VMAESCALE_STATUS_FILE:-$VMAESCALE_HOME/.vmaescale-status.$SLURM_JOB_ID}"
    rm -f "$VMAESCALE_STATUS_FILE"
    STOP_SIGNAL=$([ "$LAUNCH_FORM" = torchrun ] && echo TERM || echo USR1)
    echo "vmaescale: job $SLURM_JOB_ID (start $(( ${SLURM_RESTART_COUNT:-0} + 1 ))) on $SLURM_JOB_NODELIST," \
         "rendezvous $MASTER_ADDR:$MASTER_PORT, form $LAUNCH_FORM"
}

# srun with the container options when CONTAINER_IMAGE is set (pyxis / enroot).
srun_cmd() {
    local args=(srun)
    if [ -n "$CONTAINER_IMAGE" ]; then
        args+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$VMAESCALE_HOME")
        if [ -n "$CONTAINER_MOUNTS" ]; then args+=(--container-mounts="$CONTAINER_MOUNTS"); fi
    fi
    echo "${args[@]}"
}

# The command of one training step in the chosen form.
step_cmd() {
    local entry=$1; shift
    case "$LAUNCH_FORM" in
        srun)      # one task per GPU; each rank derives RANK etc. from SLURM_* (vmaescale.cluster)
            echo "$(srun_cmd) python $entry" ;;
        torchrun)  # one task per node; torchrun starts GPUS_PER_NODE workers, c10d rendezvous
            echo "$(srun_cmd) --ntasks-per-node=1 python -m torch.distributed.run" \
                 "--nnodes=$SLURM_JOB_NUM_NODES --nproc-per-node=$GPUS_PER_NODE" \
                 "--rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv-id=$SLURM_JOB_ID" \
                 "--shutdown-timeout=$STOP_GRACE_S $entry" ;;
        *)
            echo "vmaescale: LAUNCH_FORM=$LAUNCH_FORM; accepted: srun (one task per GPU) or torchrun (one task per node)" >&2
            exit 2 ;;
    esac
}

on_stop_signal() {
    STOPPING=1
    INTERRUPTED=1
    echo "vmaescale: got SIG$1: asking the ranks to checkpoint and exit (SIG$STOP_SIGNAL to every job step)"
    scancel --signal="$STOP_SIGNAL" "$SLURM_JOB_ID"
}

# Run "$@" in the background (a trap runs only between foreground commands) and wait for it,
# again after each trap; sets RC.
run_and_wait() {
    STOPPING=0
    trap 'on_stop_signal USR1' USR1
    trap 'on_stop_signal TERM' TERM
    "$@" &
    local pid=$! status
    RC=
    while :; do
        INTERRUPTED=0
        wait "$pid"; status=$?
        if [ "$status" = 127 ] && [ -n "$RC" ]; then break; fi   # collected already
        RC=$status
        [ "$INTERRUPTED" = 1 ] || break
    done
    trap - USR1 TERM
}

# After the run: requeue on exit 75 (srun returns the highest task status) or when rank 0 wrote
# `preempted` (torchrun turns 75 into 1), or when a stop signal came; else exit with its status.
finish_job() {
    local status
    status=$(cut -d' ' -f1 "$VMAESCALE_STATUS_FILE" 2>/dev/null)
    if [ "$RC" = "$EXIT_REQUEUE" ] || [ "$status" = preempted ] || [ "$STOPPING" = 1 ]; then
        echo "vmaescale: exit status $RC, run status ${status:-unknown}: requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        echo "vmaescale: scontrol requeue failed (is the job --requeue and the partition willing?);" \
             "submit the same command again to resume" >&2
        exit "$EXIT_REQUEUE"
    fi
    echo "vmaescale: exit status $RC, run status ${status:-unknown}"
    exit "$RC"
}

run_step() {
    local entry=$1; shift
    setup_job
    local cmd
    cmd=$(step_cmd "$entry") || exit 2
    echo "vmaescale: $cmd $*"
    run_and_wait $cmd "$@"
    finish_job
}

# After setup_job: a command in the batch shell that starts its own job steps.
run_batch() {
    echo "vmaescale: $*"
    run_and_wait "$@"
    finish_job
}
