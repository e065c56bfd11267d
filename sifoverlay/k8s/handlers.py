"""kopf wiring: thin handlers that call the Controller, and the one place errors are mapped.

    ImageBusy (the image's Lease or file lease is held)    -> kopf.TemporaryError (retry)
    StillRunning (delete waits for a writer pod)            -> kopf.TemporaryError (retry)
    Conflict (409: the object changed since it was read)    -> kopf.TemporaryError (retry at once)
    BadInput (bad spec, not an OCI-SIF, no overlay)         -> status Failed + kopf.PermanentError
    any other SifOverlayError                               -> kopf.TemporaryError (retry)

`register()` applies the decorators to the current default registry. It is called by the
entry script (operator/main.py) each time `kopf run` executes it, so every KopfRunner
with a fresh registry gets its own handlers; this module itself is imported only once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import kopf

from sifoverlay.errors import BadInput, ImageBusy, SifOverlayError, UsageError
from sifoverlay.k8s import metrics
from sifoverlay.k8s import well_known as wk
from sifoverlay.k8s.config import OperatorConfig, from_env
from sifoverlay.k8s.controller import Controller, StillRunning, job_result
from sifoverlay.k8s.kubeapi import Conflict, KubeApi, load_client
from sifoverlay.k8s.policy import PolicyViolation
from sifoverlay.k8s.safepath import UnsafePath, UnsafeStateDir

log = logging.getLogger(__name__)
T = TypeVar("T")
_MANAGED = {wk.LABEL_MANAGED_BY: wk.MANAGED_BY_VALUE}


def _raw(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items()}


def _owner_of(body: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(namespace, OverlayJob name, role) of a child Job or Pod."""
    meta = body.get("metadata") or {}
    name = (meta.get("annotations") or {}).get(wk.ANNOTATION_OVERLAYJOB)
    role = (meta.get("labels") or {}).get(wk.LABEL_ROLE)
    if not name or not role or not meta.get("namespace"):
        return None
    return meta["namespace"], name, role


def _post_event(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the OverlayJob (kubectl describe), posted by kopf's poster."""
    kopf.event(dict(body), type=kind, reason=reason, message=message)


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's settings for this operator (startup applies them)."""
    settings.persistence.finalizer = wk.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=wk.KOPF_ANNOTATIONS_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=wk.KOPF_ANNOTATIONS_PREFIX, key="last-handled-configuration")
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 8
    # A deleted resource keeps its finalizer until its timers have stopped. A timer tick
    # in flight (a sync handler in a thread: often the very re-check that issued the
    # ttlSecondsAfterFinished delete) never exits within kopf's "instant exit" cycles,
    # and kopf's default is to look again only after 60 s; poll each second instead.
    settings.background.instant_exit_timeout = 0.2
    settings.background.cancellation_polling = 1.0
    settings.posting.level = logging.INFO  # our explicit events below; not every log line


class Operator:
    """The handlers of one `kopf run`: holds the settings and, after startup, the Controller."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.controller: Controller | None = None

    def _ctl(self) -> Controller:
        if self.controller is None:  # startup handlers run first; this guards misuse
            raise kopf.TemporaryError("operator not started yet", delay=1)
        return self.controller

    def mapped(self, body: Mapping[str, Any] | None, fn: Callable[[], T], *, fail_on_bad_input: bool) -> T:
        try:
            return fn()
        except ImageBusy as exc:
            metrics.HANDLER_ERRORS.labels("temporary").inc()
            raise kopf.TemporaryError(str(exc), delay=self.config.lease_retry_seconds) from None
        except StillRunning as exc:
            metrics.HANDLER_ERRORS.labels("temporary").inc()
            raise kopf.TemporaryError(str(exc), delay=min(self.config.recheck_seconds, 5.0)) from None
        except Conflict as exc:  # another writer was first: redo the step on a fresh read
            metrics.HANDLER_ERRORS.labels("conflict").inc()
            raise kopf.TemporaryError(str(exc), delay=0.2) from None
        except BadInput as exc:
            if not fail_on_bad_input or body is None:
                metrics.HANDLER_ERRORS.labels("temporary").inc()
                raise kopf.TemporaryError(str(exc), delay=self.config.recheck_seconds) from None
            metrics.HANDLER_ERRORS.labels("permanent").inc()
            if isinstance(exc, PolicyViolation):
                reason = exc.reason
            elif isinstance(exc, UnsafeStateDir):
                reason = wk.REASON_UNSAFE_STATE_DIR
            elif isinstance(exc, UnsafePath):
                reason = wk.REASON_UNSAFE_PATH
            else:
                reason = wk.REASON_BAD_SPEC if isinstance(exc, UsageError) else wk.REASON_BAD_IMAGE
            self._ctl().fail(body, reason, str(exc))
            raise kopf.PermanentError(str(exc)) from None
        except SifOverlayError as exc:
            metrics.HANDLER_ERRORS.labels("temporary").inc()
            raise kopf.TemporaryError(str(exc), delay=self.config.recheck_seconds) from None
        except (kopf.TemporaryError, kopf.PermanentError):
            raise
        except Exception as exc:  # API or I/O trouble: retry at the re-check pace, keep the traceback
            metrics.HANDLER_ERRORS.labels("temporary").inc()
            log.exception("handler failed; retrying in %ss", self.config.recheck_seconds)
            raise kopf.TemporaryError(f"{type(exc).__name__}: {exc}", delay=self.config.recheck_seconds) from exc

    # --- lifecycle --------------------------------------------------------------------------------
    def startup(self, settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)
        self.controller = Controller(KubeApi(load_client()), self.config, notify=_post_event)
        metrics.serve(self.config.metrics_port, self.config.metrics_addr)

    # --- the OverlayJob ----------------------------------------------------------------------------
    def start(self, body: kopf.Body, **_: Any) -> None:
        raw = _raw(body)
        self.mapped(raw, lambda: self._ctl().start(raw), fail_on_bad_input=True)

    def delete(self, body: kopf.Body, **_: Any) -> None:
        raw = _raw(body)
        self.mapped(None, lambda: self._ctl().delete(raw), fail_on_bad_input=False)

    def recheck(self, body: kopf.Body, **_: Any) -> None:
        raw = _raw(body)
        self.mapped(None, lambda: self._ctl().recheck(raw), fail_on_bad_input=False)

    def drift(self, body: kopf.Body, **_: Any) -> None:
        raw = _raw(body)
        self.mapped(None, lambda: self._ctl().check_drift(raw), fail_on_bad_input=False)

    # --- children: events only speed things up; the recheck timer is the level-based net --------
    def job_event(self, type: str | None, body: kopf.Body, **_: Any) -> None:
        owner = _owner_of(body)
        if owner is None:
            return
        namespace, name, role = owner
        raw = _raw(body)
        ctl = self._ctl()
        if role == wk.ROLE_RECONCILE:
            if type != "DELETED":
                self.mapped(None, lambda: ctl.reconcile_job_ended(namespace, name, raw), fail_on_bad_input=False)
            return
        if type == "DELETED":
            ended: tuple[str, str] | None = (wk.RESULT_JOB_DELETED, f"Job {raw['metadata']['name']} was deleted")
        else:
            ended = job_result(raw)
        if ended is not None:
            result, message = ended
            self.mapped(None, lambda: ctl.workload_ended(namespace, name, result, message), fail_on_bad_input=False)

    def pod_event(self, type: str | None, body: kopf.Body, **_: Any) -> None:
        owner = _owner_of(body)
        if owner is None or owner[2] != wk.ROLE_WORKLOAD:
            return
        namespace, name, _role = owner
        ctl = self._ctl()
        pod = body["metadata"]["name"]
        status = body.get("status") or {}
        phase = status.get("phase")
        disrupted = any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
                        for c in status.get("conditions") or [])
        if phase == "Failed" and status.get("reason") == "Evicted":
            message = f"pod {pod} was evicted: {status.get('message', '')}".strip()
            self.mapped(None, lambda: ctl.workload_ended(namespace, name, wk.RESULT_EVICTED, message),
                        fail_on_bad_input=False)
        elif type == "DELETED" and phase not in ("Succeeded", "Failed"):
            result = wk.RESULT_EVICTED if disrupted else wk.RESULT_POD_DELETED
            self.mapped(None, lambda: ctl.workload_ended(namespace, name, result, f"pod {pod} was deleted"),
                        fail_on_bad_input=False)
        elif type == "DELETED":
            self.mapped(None, lambda: ctl.writer_gone(namespace, name), fail_on_bad_input=False)
        elif phase == "Running" and not body["metadata"].get("deletionTimestamp"):
            self.mapped(None, lambda: ctl.pod_running(namespace, name, pod), fail_on_bad_input=False)


def register(config: OperatorConfig | None = None) -> Operator:
    """Register the operator's handlers in kopf's current default registry."""
    op = Operator(config or from_env())
    crd = dict(group=wk.GROUP, version=wk.VERSION, plural=wk.PLURAL)
    kopf.on.startup()(op.startup)
    kopf.on.create(**crd, id="start")(op.start)
    kopf.on.resume(**crd, id="resume")(op.start)
    kopf.on.delete(**crd, id="reconcile-before-delete")(op.delete)
    kopf.timer(**crd, id="recheck", interval=op.config.recheck_seconds, initial_delay=op.config.recheck_seconds)(op.recheck)
    kopf.timer(**crd, id="drift", interval=op.config.drift_seconds, initial_delay=op.config.drift_seconds)(op.drift)
    kopf.on.event(group="batch", version="v1", plural="jobs", labels=_MANAGED, id="child-job")(op.job_event)
    kopf.on.event(group="", version="v1", plural="pods", labels=_MANAGED, id="child-pod")(op.pod_event)
    return op
