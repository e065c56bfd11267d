#!/usr/bin/env bash
# The end-to-end demo (docs/quickstart.md explains every step). As root on Debian 12:
#
#   ./scripts/demo.sh         install what is missing (scripts/setup.sh), then run the demo
#   ./scripts/demo.sh clean   stop everything the demo started and remove what it created
#
# It builds its own image: Debian's busybox-static (/bin/busybox, installed by
# scripts/setup.sh) laid into an OCI image layout by scripts/busybox-layout.py, then
# `sifoverlay import` makes the OCI-SIF. Nothing outside the repository is read. It adds
# an ext3 overlay, writes into it
# locally (`sifoverlay exec --writable`) and reconciles it, starts the exporter, then on
# the local single-node Slurm (`slurm_plugin/dev-cluster up`) runs three jobs with
# `sbatch --oci-sif-overlay=IMAGE`: one writes a result, one is killed with
# `scancel -s KILL` while writing, one reads the first one's result. It shows the
# reconcile, the recovery and the drift metric going back to clean, and writes
# $DEMO_OUT/summary.json (default ./demo-out). Without a working Slurm integration the
# Slurm part is skipped with the reason.
#
# `./scripts/demo.sh` and `./scripts/demo.sh clean` work from any state: after a failed or
# interrupted run, twice in a row, with or without a running Slurm.
#
# Environment: DEMO_OUT (output dir), DEMO_SKIP_SETUP=1 (skip scripts/setup.sh),
# SIFOVERLAY_IMAGE_ROOTS (must match the cluster's plugstack image_roots),
# DEMO_BUSYBOX (the static busybox to use, default /bin/busybox).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${DEMO_OUT:-$REPO/demo-out}
STATE=$OUT/state
IMAGE_ROOT=${SIFOVERLAY_IMAGE_ROOTS:-/var/tmp/sifoverlay-images}
IMAGE_ROOT=${IMAGE_ROOT%%:*}
DEMO_USER=sifdemo
DEMO_UID=4812
export SIFOVERLAY_JOURNAL_DIR=${SIFOVERLAY_JOURNAL_DIR:-/var/lib/sifoverlay/journal}
SIF=$REPO/.venv/bin/sifoverlay
START=$(date +%s)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }
die() { echo "demo: error: $*" >&2; exit 1; }
record() { echo "$1=$2" >>"$STATE"; }
recall() { if [ -f "$STATE" ]; then sed -n "s/^$1=//p" "$STATE" | tail -n1; fi; }

unmount_below() { # unmount_below DIR: whatever a killed `exec` left mounted there (deepest first)
	local target
	command -v findmnt >/dev/null || return 0
	findmnt -rn -o TARGET 2>/dev/null | awk -v d="$1/" 'index($0, d) == 1' | sort -r | while read -r target; do
		umount "$target" 2>/dev/null || fusermount3 -u "$target" 2>/dev/null || umount -l "$target" 2>/dev/null || true
		echo "demo: unmounted $target"
	done
}

clean() { # never fails: every step tolerates what an earlier, failed run left (or did not)
	if [ ! -d "$OUT" ]; then echo "demo: nothing to clean ($OUT not found)"; return 0; fi
	set +e +o pipefail
	local pid run dir jobs
	pid=$(recall exporter_pid)
	if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid"; echo "demo: stopped the exporter (pid $pid)"; fi
	run=$(recall run)
	if [ -n "$run" ] && command -v squeue >/dev/null; then
		# no slurmctld: squeue fails and prints nothing, there is nothing to cancel
		jobs=$(squeue --noheader --format='%i %j' 2>/dev/null | awk -v p="demo-$run-" 'index($2, p) == 1 {print $1}')
		for job in $jobs; do scancel "$job" 2>/dev/null && echo "demo: cancelled job $job"; done
	fi
	if [ "$(recall cluster_started)" = 1 ]; then
		slurm_plugin/dev-cluster down >/dev/null 2>&1 && echo "demo: stopped the local Slurm"
	fi
	unmount_below "$OUT"
	dir=$(recall image_dir)
	if [ -n "$dir" ] && [ -d "$dir" ]; then
		unmount_below "$dir"
		rm -rf -- "$dir" && echo "demo: removed $dir"
	fi
	if [ "$(recall user_created)" = 1 ] && id -u "$DEMO_USER" >/dev/null 2>&1; then
		userdel -r "$DEMO_USER" 2>/dev/null || userdel "$DEMO_USER" 2>/dev/null
		echo "demo: removed user $DEMO_USER"
	fi
	rm -rf -- "$OUT" || { echo "demo: error: cannot remove $OUT" >&2; return 1; }
	echo "demo: clean"
	set -e -o pipefail
}

if [ "${1:-}" = clean ]; then clean; exit $?; fi
[ $# -eq 0 ] || die "usage: $0 [clean]"
[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages, starts Slurm and mounts FUSE filesystems)"
if [ -d "$OUT" ]; then
	echo "demo: cleaning up the previous run first"
	clean || die "cannot clean up the previous run"
fi
mkdir -p "$OUT"
: >"$STATE"
RUN=$(date +%H%M%S)-$$
record run "$RUN"

# ------------------------------------------------------------------------------------------
step "0. setup: Debian packages, .venv, tools (scripts/setup.sh, idempotent)"
if [ -z "${DEMO_SKIP_SETUP:-}" ]; then bash scripts/setup.sh >"$OUT/setup.log" 2>&1 || { tail -n 20 "$OUT/setup.log"; die "scripts/setup.sh failed"; }; fi
say "ready: $SIF"
if ! id -u "$DEMO_USER" >/dev/null 2>&1; then
	useradd --create-home --uid "$DEMO_UID" --shell /bin/sh "$DEMO_USER"
	record user_created 1
fi
say "demo user: $DEMO_USER (uid $(id -u "$DEMO_USER"))"
IMGDIR=$IMAGE_ROOT/demo-$RUN
IMG=$IMGDIR/busybox.oci.sif
mkdir -p "$IMGDIR/jobs"
record image_dir "$IMGDIR"

step "1. the image: busybox-static -> OCI image layout -> sifoverlay import -> OCI-SIF"
BUSYBOX=${DEMO_BUSYBOX:-/bin/busybox}
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (apt-get install busybox-static; scripts/setup.sh does)"
LAYOUT=$OUT/busybox-layout
IMAGE_SOURCE="$BUSYBOX ($(dpkg-query -W -f='busybox-static ${Version}' busybox-static 2>/dev/null || echo 'not from a Debian package'))"
say "layout $LAYOUT from $IMAGE_SOURCE"
LAYOUT_MANIFEST=$("$REPO/.venv/bin/python" scripts/busybox-layout.py --busybox "$BUSYBOX" "$LAYOUT")
say "manifest $LAYOUT_MANIFEST"
"$SIF" import "$LAYOUT" "$IMG" | sed 's/^/   /'

step "2. sifoverlay overlay create: a 64 MiB ext3 overlay becomes the image's last layer"
"$SIF" overlay create --sparse "$IMG" | sed 's/^/   /'
status_json() { "$SIF" overlay status --json "$@" "$IMG"; }
state_now() { status_json "$@" | jq -r .state; }
say "state: $(state_now)"

step "3. the exporter (Prometheus metrics) in the background"
PORT=$("$REPO/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$SIF" exporter --scan "$IMGDIR" --listen "127.0.0.1:$PORT" --interval 1 --verify-interval 2 --hash-rate-limit 0 \
	>"$OUT/exporter.log" 2>&1 &
record exporter_pid $!
say "http://127.0.0.1:$PORT/metrics (pid $!)"
metric_state() { # the one-hot sifoverlay_overlay_state sample that is 1
	curl -fsS "http://127.0.0.1:$PORT/metrics" 2>/dev/null |
		sed -n 's/^sifoverlay_overlay_state{.*state="\([a-z-]*\)".* 1\.0$/\1/p' | head -n1
}
wait_metric() { # wait_metric STATE[|STATE...] -> the state seen, or timeout:STATE after 30 s
	local i s
	for i in $(seq 1 60); do
		s=$(metric_state)
		case "|$1|" in *"|$s|"*) [ -n "$s" ] && { echo "$s"; return 0; } ;; esac
		sleep 0.5
	done
	echo "timeout:$(metric_state)"
}
METRIC_CREATED=$(wait_metric clean)
say "sifoverlay_overlay_state: $METRIC_CREATED"

step "4. locally: sifoverlay exec --writable (no reconcile yet), then status, sync, status"
# as root, exec refuses --base-dir and $SIFOVERLAY_JOURNAL_DIR unless the admin says so
"$SIF" exec --allow-root-options --writable --no-sync --base-dir "$OUT/run" "$IMG" -- /bin/sh -c \
	"mkdir -p /results && echo 'prepared by root' > /results/README && chown $DEMO_UID:$DEMO_UID /results"
LOCAL_STATE_AFTER_WRITE=$(state_now)
say "after the write: $LOCAL_STATE_AFTER_WRITE (the recorded digest is stale)"
# modified (suspected from the superblock) until the exporter's verify pass hashes it: drift
METRIC_AFTER_WRITE=$(wait_metric "modified|drift")
say "sifoverlay_overlay_state: $METRIC_AFTER_WRITE"
# a reader (the exporter hashing the modified overlay) may hold the image for a moment:
# sync then exits 75 (busy); wait and retry as an admin would
for i in $(seq 1 60); do
	rc=0
	"$SIF" overlay sync --json "$IMG" >"$OUT/sync.json" 2>"$OUT/sync.err" || rc=$?
	[ "$rc" = 75 ] || break
	sleep 0.5
done
[ "$rc" = 0 ] || { cat "$OUT/sync.err" >&2; die "overlay sync failed (exit $rc)"; }
LOCAL_SYNC_ACTION=$(jq -r .action "$OUT/sync.json")
say "sync: $LOCAL_SYNC_ACTION in $(jq -r .seconds "$OUT/sync.json") s"
LOCAL_STATE_AFTER_SYNC=$(state_now --verify)
say "after the sync: $LOCAL_STATE_AFTER_SYNC"
METRIC_AFTER_SYNC=$(wait_metric clean)
say "sifoverlay_overlay_state: $METRIC_AFTER_SYNC"
LOCAL_READ=$("$SIF" exec --allow-root-options --base-dir "$OUT/run" "$IMG" -- cat /results/README)
say "read back: $LOCAL_READ"
"$SIF" inspect "$IMG" >"$OUT/inspect.txt"
sed -n '/^LAYER/,/^$/p' "$OUT/inspect.txt" | sed 's/^/   /'
chown -R "$DEMO_USER:" "$IMGDIR"

# ------------------------------------------------------------------------------------------
step "5. the local single-node Slurm (slurm_plugin/dev-cluster up)"
SLURM_MISSING=""
if [ ! -x slurm_plugin/dev-cluster ]; then
	SLURM_MISSING="slurm_plugin/dev-cluster is missing"
else
	running=$(slurm_plugin/dev-cluster status 2>/dev/null | grep -c ' running pid' || true)
	if [ "$running" -ge 3 ]; then
		say "already running (not restarted: other users' jobs may be on it)"
	elif slurm_plugin/dev-cluster up >"$OUT/dev-cluster.log" 2>&1; then
		record cluster_started 1
	else
		SLURM_MISSING="dev-cluster up failed: $(tail -n1 "$OUT/dev-cluster.log")"
	fi
	if [ -z "$SLURM_MISSING" ]; then
		SLURM_MISSING="sbatch has no --oci-sif-overlay option (SPANK plugin not loaded)"
		for _ in $(seq 1 20); do # the plugin may be being reinstalled right now: retry a while
			if sbatch --help 2>&1 | grep -q -- '--oci-sif-overlay'; then SLURM_MISSING=""; break; fi
			sleep 3
		done
	fi
fi

declare -A JOB_ID JOB_STATE
job_state() { squeue --noheader --states=all --format=%T --jobs "$1" 2>/dev/null | head -n1; }
wait_state() { # wait_state JOB STATE... -> prints the state reached (240 s max: the node may be shared)
	local job=$1 s i
	shift
	for i in $(seq 1 480); do
		s=$(job_state "$job")
		for want in "$@"; do [ "$s" = "$want" ] && { echo "$s"; return 0; }; done
		case $s in COMPLETED | CANCELLED | FAILED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) echo "$s"; return 0 ;; esac
		sleep 0.5
	done
	echo "${s:-UNKNOWN}"
}
submit() { # submit KEY MODE SCRIPT
	local out
	out=$(cd /tmp && runuser -u "$DEMO_USER" -- sbatch --parsable -J "demo-$RUN-$1" -o "$IMGDIR/jobs/$1.out" \
		"--oci-sif-overlay=$IMG:$2" --wrap "$3")
	JOB_ID[$1]=${out%%;*}
	say "sbatch --oci-sif-overlay=$IMG:$2 -> job ${JOB_ID[$1]} ($1)"
}

if [ -z "$SLURM_MISSING" ]; then
	say "$(sinfo --noheader --format='partition %P: %D node(s), %t' | head -n1)"
	step "6. job 'write': writes /results/answer.txt into the overlay"
	submit write rw 'echo "answer=42 from job $SLURM_JOB_ID" > /results/answer.txt; echo written'
	JOB_STATE[write]=$(wait_state "${JOB_ID[write]}" COMPLETED)
	# the Epilog freed the node at once; its reconcile worker hashes and commits (docs/slurm.md)
	for i in $(seq 1 60); do [ "$(state_now)" = clean ] && break; sleep 0.5; done
	say "state: ${JOB_STATE[write]}; image: $(state_now) (reconciled at job end by the Epilog's worker)"

	step "7. job 'killed': appends to /results/stream.txt until scancel -s KILL"
	submit killed rw 'i=0; while :; do echo "line $i" >> /results/stream.txt; i=$((i+1)); sleep 0.2; done'
	wait_state "${JOB_ID[killed]}" RUNNING >/dev/null
	sleep 3
	METRIC_DURING_JOB=$(metric_state)
	say "while it writes: image $(state_now), sifoverlay_overlay_state: $METRIC_DURING_JOB"
	scancel -s KILL "${JOB_ID[killed]}"
	say "scancel -s KILL ${JOB_ID[killed]}"
	JOB_STATE[killed]=$(wait_state "${JOB_ID[killed]}" CANCELLED)
	for i in $(seq 1 60); do [ "$(state_now)" = clean ] && break; sleep 0.5; done
	say "state: ${JOB_STATE[killed]}; the reconcile (overlay status --json):"
	status_json --verify | tee "$OUT/status-after-kill.json" | jq -c '{state, recorded_digest, actual_digest, holder, journal_pending}' | sed 's/^/   /'

	step "8. the recovery: sweeper (sifoverlay recover --slurm) and journal replay (sifoverlay recover)"
	"$SIF" recover --slurm --json >"$OUT/recover-slurm.json" 2>"$OUT/recover-slurm.err" || true
	"$SIF" recover --json >"$OUT/recover.json" 2>>"$OUT/recover-slurm.err" || true
	say "sweeper: $(jq -c . "$OUT/recover-slurm.json" 2>/dev/null || cat "$OUT/recover-slurm.err")"
	say "journal: $(jq -c . "$OUT/recover.json" 2>/dev/null || echo '?')"

	step "9. job 'read' (:ro): reads what job 'write' left"
	submit read ro 'cat /results/answer.txt; wc -l < /results/stream.txt'
	JOB_STATE[read]=$(wait_state "${JOB_ID[read]}" COMPLETED)
	sleep 0.5
	READ_OUTPUT=$(sed -n 1p "$IMGDIR/jobs/read.out")
	KILLED_LINES=$(sed -n 2p "$IMGDIR/jobs/read.out" | tr -dc 0-9)
	say "state: ${JOB_STATE[read]}; output: $READ_OUTPUT; lines the killed job wrote and kept: $KILLED_LINES"
	cp "$IMGDIR"/jobs/*.out "$OUT/" 2>/dev/null || true
else
	step "5-9. Slurm part skipped: $SLURM_MISSING"
	METRIC_DURING_JOB=""
fi

# ------------------------------------------------------------------------------------------
step "10. final check: recorded digest == sha256 of the ext3 bytes, drift metric clean"
status_json --verify >"$OUT/status-final.json"
OFFSET=$(jq -r .overlay_offset "$OUT/status-final.json")
SIZE=$(jq -r .overlay_size "$OUT/status-final.json")
BYTES_SHA=sha256:$(tail -c +$((OFFSET + 1)) "$IMG" | head -c "$SIZE" | sha256sum | cut -d' ' -f1)
say "recorded: $(jq -r .recorded_digest "$OUT/status-final.json")"
say "sha256sum of bytes [$OFFSET, $((OFFSET + SIZE))): $BYTES_SHA"
METRIC_FINAL=$(wait_metric clean)
curl -fsS "http://127.0.0.1:$PORT/metrics" | grep -E '^sifoverlay_(overlay_state|journal_pending)' | grep -v ' 0\.0$' | sed 's/^/   /' || true

jq -n \
	--arg image "$IMG" --arg image_source "$IMAGE_SOURCE" --arg layout_manifest "$LAYOUT_MANIFEST" \
	--arg local_after_write "$LOCAL_STATE_AFTER_WRITE" --arg local_sync "$LOCAL_SYNC_ACTION" \
	--arg local_after_sync "$LOCAL_STATE_AFTER_SYNC" --arg local_read "$LOCAL_READ" \
	--arg slurm_missing "$SLURM_MISSING" \
	--arg write_id "${JOB_ID[write]:-}" --arg write_state "${JOB_STATE[write]:-}" \
	--arg killed_id "${JOB_ID[killed]:-}" --arg killed_state "${JOB_STATE[killed]:-}" \
	--arg read_id "${JOB_ID[read]:-}" --arg read_state "${JOB_STATE[read]:-}" \
	--arg read_output "${READ_OUTPUT:-}" --arg killed_lines "${KILLED_LINES:-}" \
	--arg m_created "$METRIC_CREATED" --arg m_write "$METRIC_AFTER_WRITE" --arg m_sync "$METRIC_AFTER_SYNC" \
	--arg m_job "${METRIC_DURING_JOB:-}" --arg m_final "$METRIC_FINAL" \
	--arg bytes_sha "$BYTES_SHA" --slurpfile final "$OUT/status-final.json" \
	--arg seconds "$(($(date +%s) - START))" '
{
  image: $image,
  source: {busybox: $image_source, layout_manifest: $layout_manifest},
  local: {state_after_write: $local_after_write, sync: $local_sync, state_after_sync: $local_after_sync, read_back: $local_read},
  slurm: (if $slurm_missing == "" then {
      ran: true,
      jobs: {write: {id: $write_id, state: $write_state},
             killed: {id: $killed_id, state: $killed_state},
             read: {id: $read_id, state: $read_state, output: $read_output}},
      killed_job_lines_kept: ($killed_lines | tonumber? // null)}
    else {ran: false, missing: $slurm_missing} end),
  metrics: {after_create: $m_created, after_local_write: $m_write, after_sync: $m_sync, during_job: $m_job, final: $m_final},
  final: {state: $final[0].state, recorded_digest: $final[0].recorded_digest, actual_digest: $final[0].actual_digest,
          sha256_of_ext3_bytes: $bytes_sha, digest_matches_bytes: ($final[0].recorded_digest == $bytes_sha),
          journal_pending: $final[0].journal_pending},
  seconds: ($seconds | tonumber)
}' >"$OUT/summary.json"

step "summary ($OUT/summary.json)"
jq -r '
  "   local:  write -> \(.local.state_after_write), sync -> \(.local.sync), then \(.local.state_after_sync)",
  (if .slurm.ran then
    "   slurm:  write \(.slurm.jobs.write.state), killed \(.slurm.jobs.killed.state) (\(.slurm.killed_job_lines_kept) lines kept), read \(.slurm.jobs.read.state): \(.slurm.jobs.read.output)"
   else "   slurm:  skipped: \(.slurm.missing)" end),
  "   metric: \(.metrics.after_create) -> \(.metrics.after_local_write) -> \(.metrics.after_sync)\(if .metrics.during_job != "" then " -> \(.metrics.during_job) (job running)" else "" end) -> \(.metrics.final)",
  "   image:  \(.final.state), digest == sha256(ext3 bytes): \(.final.digest_matches_bytes), journal pending: \(.final.journal_pending)",
  "   time:   \(.seconds) s      (stop the exporter and remove the demo: ./scripts/demo.sh clean)"' "$OUT/summary.json"
