"""One coordination.k8s.io/v1 Lease per image: at most one OverlayJob writes an image.

All Leases live in one namespace (the operator's), named from the image identity only, so
two resources in different namespaces that name the same host file contend for one name.
Creating the Lease is the atomic "take" (the API server refuses a second create with 409).

The holder's liveness is its OverlayJob, not a renew timer: a workload can run for days
and the operator may be down meanwhile. A Lease is taken over only if its holder no longer
exists (another uid, or gone) or already finished (terminal phase: it reconciled).
The engine's file lease beside the image still guards the bytes themselves, including
against writers that do not go through Kubernetes.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from sifoverlay.k8s import builders, names
from sifoverlay.k8s.builders import ImageRef
from sifoverlay.k8s.kubeapi import KubeApi
from sifoverlay.k8s.status import is_terminal

log = logging.getLogger(__name__)

DURATION_SECONDS = 3600  # informational: holders are checked by existence, not expiry


class ImageLeases:
    def __init__(self, api: KubeApi, namespace: str) -> None:
        self._api = api
        self._namespace = namespace

    def acquire(self, ref: ImageRef, body: Mapping[str, Any], *, now: dt.datetime) -> str | None:
        """Take the image's Lease for `body`. None when held by it (now or already),
        else the current holder's "namespace/name"."""
        meta = body["metadata"]
        wanted = builders.lease(ref, namespace=self._namespace, holder_namespace=meta["namespace"],
                                holder_name=meta["name"], holder_uid=meta["uid"], now=now,
                                duration_seconds=DURATION_SECONDS)
        for _attempt in range(3):  # create / inspect / take over, with races in between
            if self._api.create_lease(wanted):
                log.info("%s/%s took the Lease of %s", meta["namespace"], meta["name"], ref.identity)
                return None
            existing = self._api.get_lease(self._namespace, names.lease_name(ref.identity))
            if existing is None:
                continue
            holder, holder_uid = builders.lease_holder(existing)
            if holder_uid == meta["uid"]:
                return None
            if not self._holder_is_stale(holder, holder_uid):
                return holder
            log.warning("Lease of %s: holder %s is gone or finished; taking over", ref.identity, holder)
            # exactly the Lease judged stale: if another replica took it over meanwhile (new
            # uid) or it changed (new resourceVersion), the server refuses the delete (409)
            self._api.delete_lease(self._namespace, existing["metadata"]["name"], uid=existing["metadata"].get("uid"),
                                   resource_version=existing["metadata"].get("resourceVersion"))
        existing = self._api.get_lease(self._namespace, names.lease_name(ref.identity))
        return builders.lease_holder(existing)[0] if existing else "unknown"

    def release(self, ref: ImageRef, uid: str) -> bool:
        """Delete the Lease if `uid` holds it; True if it did."""
        existing = self._api.get_lease(self._namespace, names.lease_name(ref.identity))
        if existing is None or builders.lease_holder(existing)[1] != uid:
            return False
        return self._api.delete_lease(self._namespace, existing["metadata"]["name"], uid=existing["metadata"].get("uid"),
                                      resource_version=existing["metadata"].get("resourceVersion"))

    def holder(self, ref: ImageRef) -> tuple[str, str] | None:
        existing = self._api.get_lease(self._namespace, names.lease_name(ref.identity))
        return builders.lease_holder(existing) if existing else None

    def _holder_is_stale(self, holder: str, holder_uid: str) -> bool:
        namespace, _, name = holder.partition("/")
        if not name:
            return True
        other = self._api.get_overlayjob(namespace, name)
        if other is None or other["metadata"].get("uid") != holder_uid:
            return True
        return is_terminal(other.get("status"))
