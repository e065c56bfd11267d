"""Names of the objects the operator creates, derived from their parent.

Kubernetes caps label values and most object names that end up in labels (a Job's name
becomes its Pods' `job-name` label) at 63 characters of [a-z0-9-]. A name that would be
longer is cut and given a hash suffix of the full name, so two long parents never collide
and the same parent always yields the same child name (handlers are re-run).
"""

from __future__ import annotations

import hashlib
import re

from sifoverlay.errors import UsageError

MAX_NAME: int = 63
HASH_LEN: int = 8
LEASE_PREFIX: str = "sifoverlay-image-"
WORKLOAD_SUFFIX: str = "-run"
RECONCILE_SUFFIX: str = "-reconcile"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def short_hash(text: str, length: int = HASH_LEN) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def fit(base: str, suffix: str = "") -> str:
    """`base + suffix` if it is a valid name of at most 63 chars, else a cut base plus a
    hash of the full name plus the suffix (always exactly 63 chars or fewer)."""
    full = base + suffix
    if len(full) <= MAX_NAME:
        return full
    digest = short_hash(full)
    keep = MAX_NAME - len(suffix) - HASH_LEN - 1
    return f"{base[:keep].rstrip('-')}-{digest}{suffix}"


def check_dns_label(name: str, what: str = "name") -> str:
    if len(name) > MAX_NAME or not _DNS_LABEL.fullmatch(name):
        raise UsageError(None, f"{what} {name!r} is not a DNS label (a-z, 0-9, '-', at most {MAX_NAME} chars)")
    return name


def workload_job_name(overlayjob: str) -> str:
    """The child batch/v1 Job that runs the user's command."""
    return fit(overlayjob, WORKLOAD_SUFFIX)


def reconcile_job_name(overlayjob: str) -> str:
    """The short batch/v1 Job that reconciles an image the operator cannot see itself."""
    return fit(overlayjob, RECONCILE_SUFFIX)


def image_key(identity: str) -> str:
    """A 20-hex-digit key of an image identity (see builders.image_identity)."""
    return short_hash(identity, 20)


def lease_name(identity: str) -> str:
    """One coordination.k8s.io Lease per image, named from its identity only: every
    OverlayJob on the same image, in any namespace, contends for this one name."""
    return LEASE_PREFIX + image_key(identity)


def session_job_id(namespace: str, name: str, uid: str) -> str:
    """The job id used in journal session records and the pod's `exec --job-id`: the
    uid keeps a re-created resource of the same name from resuming an old session."""
    return f"k8s-{namespace}-{name}-{uid[:8]}"
