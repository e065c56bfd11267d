"""Every Kubernetes string the operator and the chart agree on, in one place.

No other module spells out a group, kind, label, annotation, finalizer, condition type
or reason: they import it from here (the chart's CRD and RBAC repeat some of them, and
tests/k8s/test_chart.py checks the two agree).
"""

from __future__ import annotations

from typing import Final

# --- the custom resource ------------------------------------------------------------
GROUP: Final = "sifoverlay.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "OverlayJob"
PLURAL: Final = "overlayjobs"
SINGULAR: Final = "overlayjob"
SHORT_NAMES: Final = ("ovj",)
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

# --- objects the operator creates -----------------------------------------------------
LEASE_API_VERSION: Final = "coordination.k8s.io/v1"
JOB_API_VERSION: Final = "batch/v1"
FIELD_MANAGER: Final = "sifoverlay-operator"
# The operator's own kubernetes-client requests carry this User-Agent (kopf's carry
# "kopf/<version>"); the RBAC audit test attributes API calls by it.
USER_AGENT: Final = "sifoverlay-operator/0.1"

# --- labels (set by the operator on child Jobs, their Pods and Leases) ----------------
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE: Final = "sifoverlay-operator"
LABEL_OVERLAYJOB: Final = f"{GROUP}/overlayjob"  # name of the owning OverlayJob
LABEL_ROLE: Final = f"{GROUP}/role"  # ROLE_WORKLOAD or ROLE_RECONCILE
ROLE_WORKLOAD: Final = "workload"
ROLE_RECONCILE: Final = "reconcile"
LABEL_IMAGE_KEY: Final = f"{GROUP}/image-key"  # short hash of the image identity (Lease + Jobs)

# --- annotations -------------------------------------------------------------------------
# On the OverlayJob, set by a user: "true" lets deletion skip the reconcile (the escape
# hatch; the journal session stays open so `sifoverlay recover` reconciles later).
ANNOTATION_SKIP_RECONCILE: Final = f"{GROUP}/skip-reconcile-on-delete"
# On Leases and child Jobs: the full image identity the short key was derived from.
ANNOTATION_IMAGE_IDENTITY: Final = f"{GROUP}/image-identity"
# On child Jobs and their Pods: the owning OverlayJob's full name (a label value is cut
# to 63 chars; this is how an event on a Pod finds its resource).
ANNOTATION_OVERLAYJOB: Final = f"{GROUP}/overlayjob-name"
# On Leases: uid of the holding OverlayJob (holderIdentity carries namespace/name).
ANNOTATION_HOLDER_UID: Final = f"{GROUP}/holder-uid"

# --- finalizer ---------------------------------------------------------------------------
# kopf's persistence finalizer, renamed: while present, the resource cannot disappear
# before its overlay was reconciled and its Lease released.
FINALIZER: Final = f"{GROUP}/reconcile"

# --- kopf storage keys (annotations/status used by kopf itself) --------------------------
KOPF_ANNOTATIONS_PREFIX: Final = f"kopf.{GROUP}"

# --- status.phase ----------------------------------------------------------------------------
PHASE_PENDING: Final = "Pending"
PHASE_WAITING: Final = "Waiting"  # another OverlayJob holds the image's Lease
PHASE_RUNNING: Final = "Running"
PHASE_RECONCILING: Final = "Reconciling"
PHASE_SUCCEEDED: Final = "Succeeded"
PHASE_FAILED: Final = "Failed"
PHASES: Final = (PHASE_PENDING, PHASE_WAITING, PHASE_RUNNING, PHASE_RECONCILING, PHASE_SUCCEEDED, PHASE_FAILED)
TERMINAL_PHASES: Final = frozenset({PHASE_SUCCEEDED, PHASE_FAILED})

# --- condition types (metav1.Condition shape, Kueue style) ---------------------------------
COND_LEASE_ACQUIRED: Final = "LeaseAcquired"
COND_MOUNTED: Final = "Mounted"
COND_JOB_RUNNING: Final = "JobRunning"
COND_RECONCILING: Final = "Reconciling"
COND_RECONCILED: Final = "Reconciled"
COND_DRIFT_DETECTED: Final = "DriftDetected"
COND_FAILED: Final = "Failed"
# summary conditions (kstatus / kubectl wait): see status.summarize
COND_READY: Final = "Ready"
COND_COMPLETE: Final = "Complete"
COND_STALLED: Final = "Stalled"
COND_SEALED: Final = "Sealed"  # only with spec.policy.sealOnSuccess
CONDITION_TYPES: Final = (
    COND_READY,
    COND_COMPLETE,
    COND_LEASE_ACQUIRED,
    COND_MOUNTED,
    COND_JOB_RUNNING,
    COND_RECONCILING,
    COND_RECONCILED,
    COND_DRIFT_DETECTED,
    COND_SEALED,
    COND_FAILED,
    COND_STALLED,
)

# --- condition reasons (CamelCase, bounded set) -----------------------------------------------
REASON_ACQUIRED: Final = "Acquired"
REASON_HELD_BY_OTHER: Final = "HeldByOther"
REASON_RELEASED: Final = "Released"
REASON_JOB_CREATED: Final = "JobCreated"  # Event: the child Job was created
REASON_UNMOUNTED: Final = "Unmounted"
REASON_JOB_STARTED: Final = "JobStarted"
REASON_POD_RUNNING: Final = "PodRunning"  # Mounted=True: `sifoverlay exec` runs in the pod
REASON_JOB_SUCCEEDED: Final = "JobSucceeded"
REASON_JOB_FAILED: Final = "JobFailed"
REASON_POD_EVICTED: Final = "PodEvicted"
REASON_POD_DELETED: Final = "PodDeleted"
REASON_JOB_DELETED: Final = "JobDeleted"
REASON_RESOURCE_DELETED: Final = "ResourceDeleted"
REASON_IN_PROGRESS: Final = "InProgress"
REASON_DONE: Final = "Done"
REASON_WAITING_FOR_PODS: Final = "WaitingForPods"  # never reconcile while a writer pod may run
REASON_RECONCILE_JOB: Final = "ReconcileJobRunning"  # image not visible to the operator
REASON_OVERLAY_CHANGED: Final = "OverlayChanged"  # reconciled: manifest got a new digest
REASON_UNCHANGED: Final = "Unchanged"  # reconciled: nothing to do (noop)
REASON_JOURNAL_REPLAYED: Final = "JournalReplayed"  # an interrupted commit was recovered first
REASON_SKIPPED: Final = "Skipped"  # escape hatch used on delete
REASON_IN_SYNC: Final = "InSync"
REASON_DRIFT: Final = "OverlayDrift"
REASON_UNKNOWN_STATE: Final = "StateUnknown"
REASON_BAD_SPEC: Final = "InvalidSpec"
REASON_BAD_IMAGE: Final = "InvalidImage"
REASON_RECONCILE_ERROR: Final = "ReconcileError"
REASON_SUCCEEDED: Final = "Succeeded"  # Ready/Complete True
REASON_FAILED: Final = "Failed"  # Failed True without a more precise reason
REASON_PHASE_CHANGED: Final = "PhaseChanged"  # Event on every phase change
REASON_TTL_EXPIRED: Final = "TTLExpired"  # Event: deleted ttlSecondsAfterFinished after it finished
# least privilege (status Failed reason; the message names the policy rule)
REASON_IMAGE_VOLUME_NOT_ALLOWED: Final = "ImageVolumeNotAllowed"
REASON_RUNNER_IMAGE_NOT_ALLOWED: Final = "RunnerImageNotAllowed"
REASON_USER_NOT_ALLOWED: Final = "UserNotAllowed"
REASON_VOLUME_NOT_ALLOWED: Final = "VolumeNotAllowed"
REASON_ENV_NOT_ALLOWED: Final = "EnvNotAllowed"
REASON_UNSAFE_PATH: Final = "UnsafeImagePath"  # a symlink, or not a regular file, beneath the volume root
REASON_UNSAFE_STATE_DIR: Final = "UnsafeStateDirectory"  # the engine's state/journal directory is not root's alone
REASON_SEALED: Final = "Sealed"

# --- job results recorded in status.jobResult ------------------------------------------------
RESULT_SUCCEEDED: Final = "Succeeded"
RESULT_FAILED: Final = "Failed"
RESULT_EVICTED: Final = "Evicted"
RESULT_POD_DELETED: Final = "PodDeleted"
RESULT_JOB_DELETED: Final = "JobDeleted"
RESULT_CANCELLED: Final = "Cancelled"  # the OverlayJob was deleted while running

# --- paths inside the workload pod -------------------------------------------------------------
IMAGE_MOUNT_PATH: Final = "/sifoverlay/image"  # the image's volume
WORK_MOUNT_PATH: Final = "/run/sifoverlay"
USER_MOUNT_ROOT: Final = "/sifoverlay/user"  # the user's template volumes, in the runner container  # emptyDir: `sifoverlay exec` assembles the rootfs below it
WORKLOAD_CONTAINER: Final = "workload"
RECONCILE_CONTAINER: Final = "reconcile"
FUSE_DEVICE: Final = "/dev/fuse"
ENV_JOURNAL_DIR: Final = "SIFOVERLAY_JOURNAL_DIR"
ENV_STATE_DIR: Final = "SIFOVERLAY_STATE_DIR"
