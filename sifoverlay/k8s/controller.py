"""What the operator does, independent of kopf's wiring (handlers.py calls these).

Every entry point is idempotent and level-based: it reads the resource's current status,
the child Job, its Pods, the Lease and the journal, and does only the next missing step.
So kopf may run a handler twice, events may come in any order, and an operator restarted
at any point continues where the last one stopped:

- start (create/resume): Lease -> journal session -> child Job -> status Running;
- workload_ended (Job/Pod events, timer, delete): status Reconciling -> [no writer pod
  left] -> engine reconcile -> session finished -> Lease released -> status terminal;
- the status is written after the reconcile: a crash in between re-runs the reconcile,
  which the engine turns into a noop (or the replay of an interrupted commit).

A per-resource lock serialises the entry points inside one operator process; an entry
leaves the lock table when nobody holds or waits for it (the table does not grow with
every resource ever seen). Across processes (two replicas during a rollout, a second
operator by mistake) the API server serialises: every status write carries the
resourceVersion it was computed from, and a 409 means "re-read and redo the step".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from sifoverlay.errors import ImageBusy, UsageError
from sifoverlay.k8s import builders, metrics, names, reconcile, safepath
from sifoverlay.k8s import status as st
from sifoverlay.k8s import well_known as wk
from sifoverlay.k8s.config import OperatorConfig
from sifoverlay.k8s.kubeapi import Conflict, KubeApi
from sifoverlay.k8s.leases import ImageLeases

log = logging.getLogger(__name__)
Obj = dict[str, Any]
_TERMINAL_POD_PHASES = ("Succeeded", "Failed")


def _fd_args(resolved: safepath.Resolved | None) -> dict[str, Any]:
    """The engine's image_fd/expect_identity for an image resolved with keep_open (none
    when the file was missing: the engine then reports it by path)."""
    if resolved is None or resolved.fd < 0:
        return {}
    return {"image_fd": resolved.fd, "expect_identity": resolved.identity}


def _close(resolved: safepath.Resolved | None) -> None:
    if resolved is not None and resolved.fd >= 0:
        os.close(resolved.fd)


class StillRunning(Exception):
    """Deletion must wait: a pod of the workload may still write the overlay."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def job_result(job: Mapping[str, Any]) -> tuple[str, str] | None:
    """(result, message) of a finished batch/v1 Job, None while it runs."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return wk.RESULT_SUCCEEDED, cond.get("message") or "Job completed"
        if cond.get("type") == "Failed":
            return wk.RESULT_FAILED, f"Job failed: {cond.get('reason', '')} {cond.get('message', '')}".strip()
    return None


def pod_is_active(pod: Mapping[str, Any]) -> bool:
    """A pod that may still run the workload (terminating counts as running)."""
    return (pod.get("status") or {}).get("phase") not in _TERMINAL_POD_PHASES


Notify = Callable[[Mapping[str, Any], str, str, str], None]  # (body, "Normal"|"Warning", reason, message)


def _no_events(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    """Default event sink (tests of the controller alone); the operator posts k8s Events."""


class Controller:
    def __init__(self, api: KubeApi, config: OperatorConfig, *, clock: Callable[[], dt.datetime] = _utcnow,
                 notify: Notify = _no_events) -> None:
        self.api = api
        self.config = config
        self._notify = notify
        self.leases = ImageLeases(api, config.lease_namespace)
        self._clock = clock
        # (namespace, name) -> [lock, number of holders and waiters]; pruned at zero
        self._locks: dict[tuple[str, str], list[Any]] = {}
        self._locks_guard = threading.Lock()

    @contextlib.contextmanager
    def _lock(self, namespace: str, name: str) -> Iterator[None]:
        key = (namespace, name)
        with self._locks_guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._locks_guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]

    def lock_table_size(self) -> int:
        with self._locks_guard:
            return len(self._locks)

    def _patch(self, body: Mapping[str, Any], patch: Mapping[str, Any]) -> Obj:
        """Patch status and return the merged status seen afterwards.

        The patch was computed from body's status at body's resourceVersion, and is sent
        with that resourceVersion (optimistic concurrency). On 409: if the object's status
        is still the one the patch was computed from (someone else changed only metadata,
        e.g. kopf's progress annotations), send it again at the new version; otherwise
        raise Conflict - the caller's step must be redone on the fresh object. Every patch
        also carries the summary conditions (Ready, Complete, Failed) of the phase it
        leaves, and a phase change posts an Event."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        base = dict(body.get("status") or {})
        gen = self._generation(body)
        full = st.summarize(base, patch, generation=gen, now=self._clock())
        version = meta.get("resourceVersion")
        for _attempt in range(5):
            try:
                updated = self.api.patch_status(namespace, name, full, resource_version=version)
                break
            except Conflict:
                fresh = self.api.get_overlayjob(namespace, name)
                if fresh is None or fresh["metadata"].get("uid") != meta.get("uid") or \
                        dict(fresh.get("status") or {}) != base:
                    metrics.STATUS_CONFLICTS.labels("redo").inc()
                    raise
                metrics.STATUS_CONFLICTS.labels("retried").inc()
                version = fresh["metadata"].get("resourceVersion")
        else:
            metrics.STATUS_CONFLICTS.labels("redo").inc()
            raise Conflict(f"OverlayJob {namespace}/{name}: status kept changing")
        new_status = dict((updated or {}).get("status") or {})
        if isinstance(body, dict) and updated:
            body["status"] = new_status  # later patches of this step build on what was written
            body["metadata"]["resourceVersion"] = (updated.get("metadata") or {}).get("resourceVersion")
        old_phase, new_phase = base.get("phase"), full.get("phase")
        if new_phase and new_phase != old_phase and updated:
            metrics.observe_phase(namespace, name, str(new_phase), time.time())
            self._notify(body, "Warning" if new_phase == wk.PHASE_FAILED else "Normal", wk.REASON_PHASE_CHANGED,
                         f"phase {old_phase or wk.PHASE_PENDING} -> {new_phase}")
        return new_status

    def _job_id(self, body: Mapping[str, Any]) -> str:
        meta = body["metadata"]
        return names.session_job_id(meta["namespace"], meta["name"], meta["uid"])

    @staticmethod
    def _generation(body: Mapping[str, Any]) -> int:
        return int(body["metadata"].get("generation") or 1)

    # --- create / resume ------------------------------------------------------------------------
    def start(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        with self._lock(meta["namespace"], meta["name"]):
            # the handler's body may predate a status written by an event handler: re-read
            body = self.api.get_overlayjob(meta["namespace"], meta["name"]) or body
            status = dict(body.get("status") or {})
            if st.is_terminal(status) or body["metadata"].get("uid") != meta["uid"]:
                return
            if status.get("phase") in (wk.PHASE_RUNNING, wk.PHASE_RECONCILING):
                self._recheck_locked(body, status)  # resumed after a restart
                return
            self._start_locked(body, status)

    def _start_locked(self, body: Mapping[str, Any], status: Obj) -> None:
        meta, spec = body["metadata"], body["spec"]
        gen, now = self._generation(body), self._clock()
        ref = builders.image_ref(spec, meta["namespace"], name=meta["name"])
        job = builders.workload_job(body, policy=self.config.pod_policy)  # validates before any effect
        if ref.local_parts(self.config.volume_roots) is not None:  # root's own records: before any effect
            safepath.check_state_dirs(f"OverlayJob {meta['namespace']}/{meta['name']}",
                                      self.config.state_for(ref), self.config.journal_for(ref))
        # no symlink beneath the volume root, before any effect; the engine reads that fd
        resolved = self._resolve(ref, body, keep_open=True)
        try:
            self._start_resolved(body, status, ref, job, resolved)
        finally:
            _close(resolved)

    def _start_resolved(self, body: Mapping[str, Any], status: Obj, ref: builders.ImageRef, job: Obj,
                        resolved: safepath.Resolved | None) -> None:
        meta, spec = body["metadata"], body["spec"]
        gen, now = self._generation(body), self._clock()
        holder = self.leases.acquire(ref, body, now=now)
        if holder is not None:
            if status.get("phase") != wk.PHASE_WAITING or status.get("leaseHolder") != holder:
                self._patch(body, st.waiting(status, identity=ref.identity, holder=holder, generation=gen, now=now))
                metrics.LEASE_WAITS.inc()
                self._notify(body, "Normal", wk.REASON_HELD_BY_OTHER, f"waiting for OverlayJob {holder} to release the image")
            raise ImageBusy(ref.identity, f"image is held by OverlayJob {holder}", holder=holder)
        try:
            local = None if resolved is None else resolved.path
            before = manifest = None
            if local is not None:
                journal = self.config.journal_for(ref)
                before, manifest = reconcile.current_digests(local, journal, state_dir=self.config.state_for(ref),
                                                             **_fd_args(resolved))
                if spec.get("mode", "rw") == "rw" and resolved is not None and resolved.fd >= 0:
                    from sifoverlay.engine.capacity import preflight  # issue 18: its final sync must be able to commit

                    # CapacityError (BadInput): Failed with the one-line reason
                    preflight(local, resolved.fd, min_free_bytes=self.config.min_free_bytes)
                reconcile.start_session(journal, self._job_id(body), local,
                                        writable=spec.get("mode", "rw") == "rw")
            if not self.api.create_job(job):
                self._check_owned(job, meta["uid"])
        except UsageError:
            raise
        except Exception:
            if status.get("phase") in (None, wk.PHASE_PENDING, wk.PHASE_WAITING) and not self._job_exists(job):
                self.leases.release(ref, meta["uid"])  # nothing ran: let others have the image
            raise
        holder_name = f"{meta['namespace']}/{meta['name']}"
        self._patch(body, st.started(status, identity=ref.identity, holder=holder_name,
                                     job_name=job["metadata"]["name"], digest_before=before,
                                     manifest_digest=manifest, generation=gen, now=now))
        log.info("%s: started Job %s on %s", holder_name, job["metadata"]["name"], ref.identity)
        self._notify(body, "Normal", wk.REASON_JOB_CREATED, f"created Job {job['metadata']['name']} on image {ref.identity}")

    def _resolve(self, ref: builders.ImageRef, body: Mapping[str, Any], *,
                 keep_open: bool = False) -> safepath.Resolved | None:
        """The image in the operator's own mount of its volume, resolved beneath the volume
        root without following symlinks (safepath); None if the operator does not mount
        the volume. A missing file is left to the engine's own error (InvalidImage)."""
        parts = ref.local_parts(self.config.volume_roots)
        if parts is None:
            return None
        meta = body["metadata"]
        try:
            return safepath.resolve_image(*parts, what=f"OverlayJob {meta['namespace']}/{meta['name']}",
                                          keep_open=keep_open)
        except FileNotFoundError:
            root, path = parts
            return safepath.Resolved(f"{root}/{path}", (-1, -1), -1, 0)

    def _job_exists(self, job: Mapping[str, Any]) -> bool:
        return self.api.get_job(job["metadata"]["namespace"], job["metadata"]["name"]) is not None

    def _check_owned(self, job: Mapping[str, Any], uid: str) -> None:
        existing = self.api.get_job(job["metadata"]["namespace"], job["metadata"]["name"]) or {}
        owners = (existing.get("metadata") or {}).get("ownerReferences") or []
        if not any(o.get("uid") == uid for o in owners):
            raise UsageError(f"Job {job['metadata']['namespace']}/{job['metadata']['name']}",
                             "a Job of this name exists and is not owned by this OverlayJob")

    def fail(self, body: Mapping[str, Any], reason: str, message: str) -> None:
        """A permanent error before the workload ran: status Failed, Lease released."""
        meta = body["metadata"]
        with self._lock(meta["namespace"], meta["name"]):
            body = self.api.get_overlayjob(meta["namespace"], meta["name"]) or dict(body)
            if body["metadata"].get("uid") != meta.get("uid"):
                return
            status = dict(body.get("status") or {})
            self._patch(body, st.failed(status, reason=reason, message=message,
                                        generation=self._generation(body), now=self._clock()))
        self._notify(body, "Warning", reason, message)
        try:
            ref = builders.image_ref(body["spec"], meta["namespace"], name=meta["name"])
        except UsageError:
            return
        self.leases.release(ref, meta["uid"])

    # --- the workload ended (events, timer, delete) -------------------------------------------------
    def workload_ended(self, namespace: str, name: str, result: str, message: str) -> None:
        with self._lock(namespace, name):
            body = self.api.get_overlayjob(namespace, name)
            if body is None:
                return
            self._ended_locked(body, dict(body.get("status") or {}), result, message)

    def writer_gone(self, namespace: str, name: str) -> None:
        """A finished pod disappeared: a reconcile that waited for it may go on now."""
        with self._lock(namespace, name):
            body = self.api.get_overlayjob(namespace, name)
            if body is not None and (body.get("status") or {}).get("phase") == wk.PHASE_RECONCILING:
                self._reconcile_locked(body, dict(body["status"]))

    def pod_running(self, namespace: str, name: str, pod: str) -> None:
        with self._lock(namespace, name):
            body = self.api.get_overlayjob(namespace, name)
            status = dict((body or {}).get("status") or {})
            if body is None or status.get("phase") != wk.PHASE_RUNNING:
                return
            if (builders.condition_of(status, wk.COND_MOUNTED) or {}).get("status") == "True":
                return
            self._patch(body, st.pod_running(status, pod=pod, writable=body["spec"].get("mode", "rw") == "rw",
                                             generation=self._generation(body), now=self._clock()))

    def _ended_locked(self, body: Mapping[str, Any], status: Obj, result: str, message: str) -> None:
        phase = status.get("phase")
        if phase == wk.PHASE_RUNNING:
            status = self._patch(body, st.job_ended(status, result=result, message=message,
                                                    generation=self._generation(body), now=self._clock()))
            metrics.WORKLOADS_ENDED.labels(result).inc()
            self._notify(body, "Normal" if result == wk.RESULT_SUCCEEDED else "Warning", result, message)
            log.info("%s/%s: workload ended (%s): %s", body["metadata"]["namespace"], body["metadata"]["name"],
                     result, message)
        if status.get("phase") == wk.PHASE_RECONCILING:
            self._reconcile_locked(body, status)

    def _writer_pods(self, body: Mapping[str, Any]) -> list[str]:
        meta = body["metadata"]
        selector = f"{wk.LABEL_OVERLAYJOB}={names.fit(meta['name'])},{wk.LABEL_ROLE}={wk.ROLE_WORKLOAD}"
        pods = self.api.list_pods(meta["namespace"], selector)
        return [p["metadata"]["name"] for p in pods
                if (p["metadata"].get("annotations") or {}).get(wk.ANNOTATION_OVERLAYJOB) == meta["name"]
                and pod_is_active(p)]

    def _reconcile_locked(self, body: Mapping[str, Any], status: Obj) -> None:
        meta, spec = body["metadata"], body["spec"]
        gen = self._generation(body)
        running = self._writer_pods(body)
        if running:
            cond = builders.condition_of(status, wk.COND_RECONCILING)
            text = f"waiting for pod(s) {', '.join(sorted(running))} to stop writing the overlay"
            if not cond or cond.get("message") != text:
                self._patch(body, {"conditions": builders.set_conditions(
                    status.get("conditions") or [],
                    builders.condition(wk.COND_RECONCILING, True, wk.REASON_WAITING_FOR_PODS, text,
                                       generation=gen, now=self._clock()))})
            return
        ref = builders.image_ref(spec, meta["namespace"], name=meta["name"])
        if ref.local_parts(self.config.volume_roots) is None:
            self._reconcile_by_job(body, status)
            return
        seal = bool((spec.get("policy") or {}).get("sealOnSuccess")) and status.get("jobResult") == wk.RESULT_SUCCEEDED
        started = time.monotonic()
        try:
            resolved = self._resolve(ref, body, keep_open=True)
            assert resolved is not None
            try:
                outcome = reconcile.run(resolved.path, job_id=self._job_id(body),
                                        journal_dir=self.config.journal_for(ref), seal=seal,
                                        state_dir=self.config.state_for(ref), **_fd_args(resolved))
            finally:
                _close(resolved)
        except Exception as exc:
            metrics.RECONCILES.labels("error").inc()
            self._patch(body, st.reconcile_error(status, message=str(exc), generation=gen, now=self._clock()))
            raise
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        self._finish(body, status, ref, outcome)

    def _finish(self, body: Mapping[str, Any], status: Obj, ref: builders.ImageRef,
                outcome: reconcile.ReconcileOutcome) -> None:
        meta = body["metadata"]
        if ref.local_path(self.config.volume_roots) is not None:
            reconcile.finish_session(self.config.journal_for(ref), self._job_id(body), outcome.action)
        self.leases.release(ref, meta["uid"])
        label = "replayed" if outcome.replayed else outcome.action
        metrics.RECONCILES.labels(label).inc()
        patch = st.reconciled(status, action=outcome.action, replayed=outcome.replayed,
                              digest_after=outcome.digest_after, manifest_digest=outcome.manifest_digest,
                              generation=self._generation(body), now=self._clock())
        if outcome.sealed:
            patch["sealed"] = True
            patch["conditions"] = builders.set_conditions(patch["conditions"], builders.condition(
                wk.COND_SEALED, True, wk.REASON_SEALED, "the overlay was sealed into a read-only layer",
                generation=self._generation(body), now=self._clock()))
        self._patch(body, patch)
        log.info("%s/%s: reconciled (%s) overlay %s", meta["namespace"], meta["name"], outcome.action,
                 outcome.digest_after)
        self._notify(body, "Normal", wk.COND_RECONCILED, f"reconciled ({outcome.action}): overlay {outcome.digest_after}")

    # --- images the operator cannot see: a reconcile Job does it --------------------------------------
    def _reconcile_by_job(self, body: Mapping[str, Any], status: Obj) -> None:
        job = builders.reconcile_job(body, policy=self.config.pod_policy)
        created = self.api.create_job(job)
        if created:
            self._patch(body, {"conditions": builders.set_conditions(
                status.get("conditions") or [],
                builders.condition(wk.COND_RECONCILING, True, wk.REASON_RECONCILE_JOB,
                                   f"reconcile Job {job['metadata']['name']} runs on the image's volume",
                                   generation=self._generation(body), now=self._clock()))})

    def reconcile_job_ended(self, namespace: str, name: str, job: Mapping[str, Any]) -> None:
        with self._lock(namespace, name):
            body = self.api.get_overlayjob(namespace, name)
            if body is not None:
                self._reconcile_job_ended_locked(body, dict(body.get("status") or {}), job)

    def _reconcile_job_ended_locked(self, body: Mapping[str, Any], status: Obj, job: Mapping[str, Any]) -> None:
        """The reconcile Job finished: read the sync result from its pod's termination message."""
        result = job_result(job)
        if result is None or status.get("phase") != wk.PHASE_RECONCILING:
            return
        meta = body["metadata"]
        ref = builders.image_ref(body["spec"], meta["namespace"], name=meta["name"])
        if result[0] != wk.RESULT_SUCCEEDED:
            self._patch(body, st.reconcile_error(status, message=f"reconcile Job failed: {result[1]}",
                                                 generation=self._generation(body), now=self._clock()))
            metrics.RECONCILES.labels("error").inc()
            # level-based retry: the next re-check creates a fresh reconcile Job
            self.api.delete_job(meta["namespace"], job["metadata"]["name"])
            return
        messages = []
        for pod in self.api.list_pods(meta["namespace"], f"job-name={job['metadata']['name']}"):
            for container in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (container.get("state") or {}).get("terminated") or {}
                if terminated.get("exitCode") == 0:
                    messages.append(terminated.get("message") or "")
        outcome = reconcile.from_termination_message(messages[0] if messages else "", image=ref.identity)
        self._finish(body, status, ref, outcome)

    # --- level-based re-check (timer) and drift -----------------------------------------------------
    def recheck(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        with self._lock(meta["namespace"], meta["name"]):
            fresh = self.api.get_overlayjob(meta["namespace"], meta["name"])
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return  # gone, or being deleted: the finalizer's handler owns it
            self._recheck_locked(fresh, dict(fresh.get("status") or {}))

    def _recheck_locked(self, body: Mapping[str, Any], status: Obj) -> None:
        meta = body["metadata"]
        phase = status.get("phase")
        if phase:  # after a restart too: the phase-age metric knows every resource the timer sees
            metrics.observe_phase(meta["namespace"], meta["name"], str(phase), time.time())
        if phase == wk.PHASE_RUNNING:
            job = self.api.get_job(meta["namespace"], status.get("jobName") or names.workload_job_name(meta["name"]))
            if job is None:
                self._ended_locked(body, status, wk.RESULT_JOB_DELETED, "the child Job disappeared")
            elif (ended := job_result(job)) is not None:
                self._ended_locked(body, status, *ended)
        elif phase == wk.PHASE_RECONCILING:
            if (builders.condition_of(status, wk.COND_RECONCILING) or {}).get("reason") == wk.REASON_RECONCILE_JOB:
                job = self.api.get_job(meta["namespace"], names.reconcile_job_name(meta["name"]))
                if job is not None:
                    self._reconcile_job_ended_locked(body, status, job)
                return
            self._reconcile_locked(body, status)
        elif st.is_terminal(status):
            self._delete_job_when_due(body, status)

    def _delete_job_when_due(self, body: Mapping[str, Any], status: Obj) -> None:
        """spec.ttlSecondsAfterFinished: delete the OverlayJob (and its child Job) that long
        after it finished, as the TTL controller does for batch/v1 Jobs. The deprecated
        spec.policy.deleteJobAfterSeconds deletes only the child Job."""
        meta, spec = body["metadata"], body["spec"]
        finished = st.finished_at(status)
        if finished is None or meta.get("deletionTimestamp"):
            return  # not finished, or already being deleted (the finalizer's handler runs)
        now = self._clock()
        ttl = spec.get("ttlSecondsAfterFinished")
        after = (spec.get("policy") or {}).get("deleteJobAfterSeconds")
        if ttl is not None and now >= finished + dt.timedelta(seconds=int(ttl)):
            if status.get("jobName"):
                self.api.delete_job(meta["namespace"], status["jobName"])
            if self.api.delete_overlayjob(meta["namespace"], meta["name"], uid=meta["uid"]):
                log.info("%s/%s: deleted (ttlSecondsAfterFinished=%s)", meta["namespace"], meta["name"], ttl)
                self._notify(body, "Normal", wk.REASON_TTL_EXPIRED,
                             f"deleted {ttl}s after it finished (ttlSecondsAfterFinished)")
            return
        if after is not None and status.get("jobName") and now >= finished + dt.timedelta(seconds=int(after)):
            if self.api.delete_job(meta["namespace"], status["jobName"]):
                log.info("%s/%s: deleted Job %s (deleteJobAfterSeconds)", meta["namespace"], meta["name"],
                         status["jobName"])

    def check_drift(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        with self._lock(meta["namespace"], meta["name"]):
            fresh = self.api.get_overlayjob(meta["namespace"], meta["name"])
            # being deleted: the finalizer's handler owns it now; a status write here would
            # race kopf's finalizer removal (its optimistic patch then fails)
            if fresh is not None and fresh["metadata"].get("uid") == meta.get("uid") \
                    and not fresh["metadata"].get("deletionTimestamp"):
                self._check_drift_locked(fresh)

    def _check_drift_locked(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        status = dict(body.get("status") or {})
        if not st.is_terminal(status) or status.get("sealed"):
            return  # a sealed overlay is a read-only layer now: nothing can drift
        ref = builders.image_ref(body["spec"], meta["namespace"], name=meta["name"])
        if ref.local_parts(self.config.volume_roots) is None:
            return
        try:
            resolved = self._resolve(ref, body, keep_open=True)
        except safepath.UnsafePath:
            return  # a symlink was planted since: nothing is read through it
        assert resolved is not None
        holder = self.leases.holder(ref)
        metrics.set_lease_after_finish(meta["namespace"], meta["name"], bool(holder and holder[1] == meta["uid"]))
        try:
            report = reconcile.drift(resolved.path, self.config.journal_for(ref), state_dir=self.config.state_for(ref),
                                     **_fd_args(resolved))
        finally:
            _close(resolved)
        if report.state == "in-use":
            return  # a writer holds it now: its own reconcile will follow
        metrics.set_drift(meta["namespace"], meta["name"], report.state in ("modified", "drift"))
        patch = st.drift(status, state=report.state, recorded=report.recorded, actual=report.actual,
                         generation=self._generation(body), now=self._clock())
        old = builders.condition_of(status, wk.COND_DRIFT_DETECTED)
        new = builders.condition_of(patch, wk.COND_DRIFT_DETECTED)
        if old is None or new is None or (old.get("status"), old.get("reason"), old.get("message")) != \
                (new.get("status"), new.get("reason"), new.get("message")):
            self._patch(body, patch)
            if new and new["status"] == "True" and (old or {}).get("status") != "True":
                self._notify(body, "Warning", wk.REASON_DRIFT, new["message"])

    # --- deletion (the finalizer) ---------------------------------------------------------------------
    def delete(self, body: Mapping[str, Any]) -> None:
        """Reconcile-before-delete. Raises StillRunning while a workload pod may write."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        metrics.forget(namespace, name)
        skip = (meta.get("annotations") or {}).get(wk.ANNOTATION_SKIP_RECONCILE) == "true"
        with self._lock(namespace, name):
            fresh = self.api.get_overlayjob(namespace, name) or body
            status = dict(fresh.get("status") or {})
            try:
                ref = builders.image_ref(fresh["spec"], namespace, name=name)
            except UsageError:
                return  # never valid: nothing ran, nothing held
            if st.is_terminal(status):
                self.leases.release(ref, meta["uid"])
                return
            job_name = status.get("jobName") or names.workload_job_name(name)
            job_deleted = self.api.delete_job(namespace, job_name)
            if skip:
                self.leases.release(ref, meta["uid"])
                log.warning("%s/%s deleted with %s: not reconciled; run `sifoverlay recover` on %s",
                            namespace, name, wk.ANNOTATION_SKIP_RECONCILE, ref.identity)
                return
            if status.get("phase") in (None, wk.PHASE_PENDING, wk.PHASE_WAITING) and not job_deleted:
                self.leases.release(ref, meta["uid"])  # the workload never started
                return
            if status.get("phase") in (None, wk.PHASE_PENDING, wk.PHASE_WAITING):
                status = self._patch(fresh, {"phase": wk.PHASE_RUNNING})  # crashed between Job and status
            self._ended_locked(fresh, status, wk.RESULT_CANCELLED, "the OverlayJob was deleted")
            after = self.api.get_overlayjob(namespace, name) or {}
            if not st.is_terminal(after.get("status")):
                raise StillRunning(f"{namespace}/{name}: waiting for the workload to stop before the reconcile")
