# Sourced by scripts/bootstrap.sh and scripts/setup-omero-web.sh: a long step
# says what it does and how long it usually takes before it starts, and how
# long it took when done. Its commands' own output (pip's, apt's) goes to a
# log file, shown (the end of it) and named only if the step fails.
#
#   step_begin NAME "what it does" "how long it usually takes the first time"
#   step_run COMMAND...     (as many as the step needs)
#   step_end
#
# Logs: $OMEROWEBD_SETUP_LOGS (default /var/tmp/omerowebd-setup), one per step.

STEP_LOGS=${OMEROWEBD_SETUP_LOGS:-/var/tmp/omerowebd-setup}

_step_took() {
    local s=$((SECONDS - step_started))
    if ((s < 60)); then echo "${s}s"; else printf '%dm%02ds' $((s / 60)) $((s % 60)); fi
}

step_begin() {
    step_what=$2
    step_started=$SECONDS
    mkdir -p "$STEP_LOGS"
    step_log=$STEP_LOGS/$1.log
    : >"$step_log"
    echo "==> $2 (usually $3 the first time)"
}

step_run() {
    local rc=0
    "$@" >>"$step_log" 2>&1 </dev/null || rc=$?
    if ((rc != 0)); then
        {
            echo "==> FAILED after $(_step_took): $step_what"
            echo "    $* exited with $rc; the end of its output:"
            tail -n 20 "$step_log" | sed 's/^/    | /'
            echo "    all of it: $step_log"
        } >&2
        exit "$rc"
    fi
}

step_end() {
    echo "    done in $(_step_took): $step_what"
}
