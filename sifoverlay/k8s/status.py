"""Pure status transitions of an OverlayJob: current status in, merge-patch body out.

Each function returns the complete `status` patch for one step of the phase machine

    Pending -> Waiting (Lease held elsewhere) -> Running -> Reconciling -> Succeeded | Failed

with the Kueue-style conditions that step sets. `conditions` is a list, which a merge
patch replaces whole, so every patch carries the merged list (see
builders.set_conditions). Fields a step clears are set to None (merge-patch delete).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from sifoverlay.k8s import well_known as wk
from sifoverlay.k8s.builders import condition, rfc3339, set_conditions

Obj = dict[str, Any]
_JOB_END_REASONS = {
    wk.RESULT_SUCCEEDED: wk.REASON_JOB_SUCCEEDED,
    wk.RESULT_FAILED: wk.REASON_JOB_FAILED,
    wk.RESULT_EVICTED: wk.REASON_POD_EVICTED,
    wk.RESULT_POD_DELETED: wk.REASON_POD_DELETED,
    wk.RESULT_JOB_DELETED: wk.REASON_JOB_DELETED,
    wk.RESULT_CANCELLED: wk.REASON_RESOURCE_DELETED,
}


def _conds(status: Mapping[str, Any] | None) -> list[Obj]:
    return list((status or {}).get("conditions") or [])


def waiting(status: Mapping[str, Any] | None, *, identity: str, holder: str, generation: int, now: dt.datetime) -> Obj:
    message = f"image {identity} is held by OverlayJob {holder}; waiting for its Lease"
    return {
        "phase": wk.PHASE_WAITING,
        "imageIdentity": identity,
        "leaseHolder": holder,
        "observedGeneration": generation,
        "conditions": set_conditions(
            _conds(status), condition(wk.COND_LEASE_ACQUIRED, False, wk.REASON_HELD_BY_OTHER, message,
                                      generation=generation, now=now)),
    }


def started(status: Mapping[str, Any] | None, *, identity: str, holder: str, job_name: str,
            digest_before: str | None, manifest_digest: str | None, generation: int, now: dt.datetime) -> Obj:
    return {
        "phase": wk.PHASE_RUNNING,
        "imageIdentity": identity,
        "leaseHolder": holder,
        "jobName": job_name,
        "overlayDigestBefore": digest_before,
        "manifestDigest": manifest_digest,
        "observedGeneration": generation,
        "conditions": set_conditions(
            _conds(status),
            condition(wk.COND_LEASE_ACQUIRED, True, wk.REASON_ACQUIRED, f"holds the Lease of image {identity}",
                      generation=generation, now=now),
            condition(wk.COND_JOB_RUNNING, True, wk.REASON_JOB_STARTED, f"Job {job_name} created",
                      generation=generation, now=now),
        ),
    }


def pod_running(status: Mapping[str, Any] | None, *, pod: str, writable: bool, generation: int, now: dt.datetime) -> Obj:
    how = "read-write" if writable else "read-only"
    return {"conditions": set_conditions(
        _conds(status), condition(wk.COND_MOUNTED, True, wk.REASON_POD_RUNNING,
                                  f"pod {pod} is running with the overlay mounted {how}", generation=generation, now=now))}


def job_ended(status: Mapping[str, Any] | None, *, result: str, message: str, generation: int, now: dt.datetime) -> Obj:
    reason = _JOB_END_REASONS[result]
    return {
        "phase": wk.PHASE_RECONCILING,
        "jobResult": result,
        "observedGeneration": generation,
        "conditions": set_conditions(
            _conds(status),
            condition(wk.COND_JOB_RUNNING, False, reason, message, generation=generation, now=now),
            condition(wk.COND_MOUNTED, False, wk.REASON_UNMOUNTED, "the workload no longer runs",
                      generation=generation, now=now),
            condition(wk.COND_RECONCILING, True, wk.REASON_IN_PROGRESS, "reconciling the image's manifest with its overlay",
                      generation=generation, now=now),
        ),
    }


def reconcile_error(status: Mapping[str, Any] | None, *, message: str, generation: int, now: dt.datetime) -> Obj:
    """A reconcile attempt failed in a way that is retried (busy image, I/O error)."""
    return {"conditions": set_conditions(
        _conds(status), condition(wk.COND_RECONCILING, True, wk.REASON_RECONCILE_ERROR, message,
                                  generation=generation, now=now))}


def reconciled(status: Mapping[str, Any] | None, *, action: str, replayed: bool, digest_after: str | None,
               manifest_digest: str | None, generation: int, now: dt.datetime, skipped: bool = False) -> Obj:
    """The overlay was reconciled (or, with `skipped`, deliberately not: escape hatch) and
    the Lease released. Phase follows the job: Succeeded only if the workload succeeded.
    A "noop" whose digest differs from the one recorded at start means an earlier run
    committed and crashed before writing status: the overlay did change."""
    job_result = (status or {}).get("jobResult") or wk.RESULT_CANCELLED
    succeeded = job_result == wk.RESULT_SUCCEEDED
    if skipped:
        rec = condition(wk.COND_RECONCILED, False, wk.REASON_SKIPPED,
                        f"deleted with {wk.ANNOTATION_SKIP_RECONCILE}; run `sifoverlay recover` on the image",
                        generation=generation, now=now)
    elif replayed:
        rec = condition(wk.COND_RECONCILED, True, wk.REASON_JOURNAL_REPLAYED,
                        f"an interrupted commit was recovered; overlay {digest_after}", generation=generation, now=now)
    elif action == "noop" and digest_after == (status or {}).get("overlayDigestBefore"):
        rec = condition(wk.COND_RECONCILED, True, wk.REASON_UNCHANGED, f"manifest already names overlay {digest_after}",
                        generation=generation, now=now)
    else:
        rec = condition(wk.COND_RECONCILED, True, wk.REASON_OVERLAY_CHANGED,
                        f"manifest now names overlay {digest_after}", generation=generation, now=now)
    updates = [
        rec,
        condition(wk.COND_RECONCILING, False, wk.REASON_DONE, "reconcile finished", generation=generation, now=now),
        condition(wk.COND_LEASE_ACQUIRED, False, wk.REASON_RELEASED, "Lease released", generation=generation, now=now),
        condition(wk.COND_MOUNTED, False, wk.REASON_UNMOUNTED, "the workload no longer runs", generation=generation, now=now),
    ]
    if not succeeded:
        reason = _JOB_END_REASONS[job_result]
        updates.append(condition(wk.COND_FAILED, True, reason, f"workload ended: {job_result}", generation=generation, now=now))
    patch: Obj = {
        "phase": wk.PHASE_SUCCEEDED if succeeded else wk.PHASE_FAILED,
        "leaseHolder": None,
        "observedGeneration": generation,
        "conditions": set_conditions(_conds(status), *updates),
    }
    if not skipped:
        patch.update({"overlayDigestAfter": digest_after, "manifestDigest": manifest_digest,
                      "lastReconcileTime": rfc3339(now), "reconcileAction": action})
    return patch


def failed(status: Mapping[str, Any] | None, *, reason: str, message: str, generation: int, now: dt.datetime) -> Obj:
    """A permanent failure before the workload ran (bad spec, not an OCI-SIF)."""
    return {
        "phase": wk.PHASE_FAILED,
        "observedGeneration": generation,
        "conditions": set_conditions(
            _conds(status), condition(wk.COND_FAILED, True, reason, message, generation=generation, now=now)),
    }


def drift(status: Mapping[str, Any] | None, *, state: str, recorded: str | None, actual: str | None,
          generation: int, now: dt.datetime) -> Obj:
    """Level-based drift check result (engine.status state): clean -> False; modified or
    drift -> True; unknown -> Unknown-ish False with its own reason; in-use is not drift."""
    if state in ("modified", "drift"):
        cond = condition(wk.COND_DRIFT_DETECTED, True, wk.REASON_DRIFT,
                         f"overlay is {state}: manifest names {recorded}, overlay is {actual or 'changed (not hashed)'}",
                         generation=generation, now=now)
    elif state == "unknown":
        cond = condition(wk.COND_DRIFT_DETECTED, False, wk.REASON_UNKNOWN_STATE,
                         "no fingerprint recorded for the overlay (synced by another tool?)", generation=generation, now=now)
    else:
        cond = condition(wk.COND_DRIFT_DETECTED, False, wk.REASON_IN_SYNC, f"manifest names overlay {recorded}",
                         generation=generation, now=now)
    return {"conditions": set_conditions(_conds(status), cond)}


_SUMMARY_MESSAGES = {
    wk.PHASE_PENDING: "not started yet",
    wk.PHASE_WAITING: "waiting for the image's Lease",
    wk.PHASE_RUNNING: "the workload runs",
    wk.PHASE_RECONCILING: "the workload ended; reconciling the image",
    wk.PHASE_SUCCEEDED: "the workload succeeded and the image is reconciled",
    wk.PHASE_FAILED: "the OverlayJob failed",
}


def summarize(status: Mapping[str, Any] | None, patch: Mapping[str, Any], *, generation: int,
              now: dt.datetime) -> Obj:
    """`patch` plus the summary conditions of the phase it leaves, for tools that wait on
    conditions (`kubectl wait --for=condition=Complete`, kstatus, Argo CD, Flux):

    - Ready: True only once Succeeded (everything done, image reconciled); False with
      the phase as reason otherwise;
    - Complete: the same truth, the batch/v1 Job's name for it;
    - Failed: True once Failed (its reason kept from the step that failed); False with
      the phase as reason otherwise;
    - Stalled (kstatus "Failed"): True alongside Failed=True, absent otherwise;
    - Reconciled: set by the reconcile (status.reconciled); until then False with the
      phase as reason;
    - Reconciling (kstatus "InProgress"): True with the phase as reason while Pending,
      Waiting or Running (the reconcile's steps set it in phase Reconciling); never True
      once the resource finished.
    Every condition carries observedGeneration; status.observedGeneration is set too."""
    out: Obj = dict(patch)
    phase = str(out.get("phase") or (status or {}).get("phase") or wk.PHASE_PENDING)
    conds = list(out["conditions"]) if "conditions" in out else _conds(status)
    succeeded, failed = phase == wk.PHASE_SUCCEEDED, phase == wk.PHASE_FAILED
    message = _SUMMARY_MESSAGES.get(phase, phase)
    updates = [
        condition(wk.COND_READY, succeeded, wk.REASON_SUCCEEDED if succeeded else phase, message,
                  generation=generation, now=now),
        condition(wk.COND_COMPLETE, succeeded, wk.REASON_SUCCEEDED if succeeded else phase, message,
                  generation=generation, now=now),
    ]
    current_failed = next((c for c in conds if c.get("type") == wk.COND_FAILED), None)
    if failed:
        if current_failed is None or current_failed.get("status") != "True":
            current_failed = condition(wk.COND_FAILED, True, wk.REASON_FAILED, message, generation=generation, now=now)
        else:
            current_failed = {**current_failed, "observedGeneration": generation}
        updates.append(current_failed)
        updates.append(condition(wk.COND_STALLED, True, str(current_failed["reason"]), str(current_failed["message"]),
                                 generation=generation, now=now))
    else:
        updates.append(condition(wk.COND_FAILED, False, phase, message, generation=generation, now=now))
        conds = [c for c in conds if c.get("type") != wk.COND_STALLED]
    # kstatus reads Reconciling=True as InProgress (and Stalled=True as Failed, but only
    # after a Reconciling=True earlier in the list): True from the first write until the
    # resource finished - the phase as reason until the reconcile's own steps (InProgress,
    # WaitingForPods, ...) take over; never left True on a finished resource
    current_reconciling = next((c for c in conds if c.get("type") == wk.COND_RECONCILING), None)
    if not (succeeded or failed):
        if phase != wk.PHASE_RECONCILING and (current_reconciling is None
                                              or current_reconciling.get("reason") in wk.PHASES):
            updates.append(condition(wk.COND_RECONCILING, True, phase, message, generation=generation, now=now))
    elif current_reconciling is not None and current_reconciling.get("status") == "True":
        updates.append(condition(wk.COND_RECONCILING, False, phase, message, generation=generation, now=now))
    current_reconciled = next((c for c in conds if c.get("type") == wk.COND_RECONCILED), None)
    if current_reconciled is None or current_reconciled.get("reason") in wk.PHASES:
        # not reconciled (yet): False with the phase as reason, so that
        # `kubectl wait --for=condition=Reconciled` has a condition to watch from the start
        text = "nothing ran: nothing to reconcile" if failed else "the overlay is not reconciled yet"
        updates.append(condition(wk.COND_RECONCILED, False, phase, text, generation=generation, now=now))
    else:
        updates.append({**current_reconciled, "observedGeneration": generation})
    out["conditions"] = set_conditions(conds, *updates)
    out["observedGeneration"] = generation
    return out


def finished_at(status: Mapping[str, Any] | None) -> dt.datetime | None:
    """When a terminal OverlayJob finished: its Complete (Succeeded) or Failed condition's
    transition time; None while it is not finished."""
    phase = (status or {}).get("phase")
    ctype = {wk.PHASE_SUCCEEDED: wk.COND_COMPLETE, wk.PHASE_FAILED: wk.COND_FAILED}.get(str(phase))
    for cond in _conds(status):
        if ctype and cond.get("type") == ctype and cond.get("status") == "True" and cond.get("lastTransitionTime"):
            return dt.datetime.strptime(cond["lastTransitionTime"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return None


def is_terminal(status: Mapping[str, Any] | None) -> bool:
    return (status or {}).get("phase") in wk.TERMINAL_PHASES
