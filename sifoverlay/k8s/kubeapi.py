"""The few API calls the operator makes itself (kopf makes the rest), on one client.

Every call here is one RBAC rule in charts/sifoverlay/templates/rbac.yaml; the RBAC audit
test (tests/k8s/test_rbac.py) checks that the two agree. Requests carry the User-Agent
well_known.USER_AGENT. Not-found answers are returned as None, name conflicts on create
and failed delete preconditions as False, so callers stay idempotent without catching
HTTP errors. A status write carries the resourceVersion the caller read: when another
writer (a second operator replica, kopf) changed the object since, the server answers
409 and `Conflict` is raised; the caller re-reads and redoes its step (level-based).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kubernetes

from sifoverlay.k8s import well_known as wk

log = logging.getLogger(__name__)
Obj = dict[str, Any]


def load_client() -> kubernetes.client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    client = kubernetes.client.ApiClient()
    client.user_agent = wk.USER_AGENT
    return client


def _missing(exc: kubernetes.client.ApiException) -> bool:
    return exc.status == 404


class Conflict(Exception):
    """409 on a write guarded by a resourceVersion: someone else wrote first."""


class KubeApi:
    """Thin typed-dict wrapper over the official client for the operator's own calls."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self._custom = kubernetes.client.CustomObjectsApi(client)
        self._batch = kubernetes.client.BatchV1Api(client)
        self._core = kubernetes.client.CoreV1Api(client)
        self._coordination = kubernetes.client.CoordinationV1Api(client)
        self._sanitize = client.sanitize_for_serialization

    # --- OverlayJobs: get, patch status -----------------------------------------------------
    def get_overlayjob(self, namespace: str, name: str) -> Obj | None:
        try:
            return self._custom.get_namespaced_custom_object(wk.GROUP, wk.VERSION, namespace, wk.PLURAL, name)
        except kubernetes.client.ApiException as exc:
            if _missing(exc):
                return None
            raise

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any], *,
                     resource_version: str | None = None) -> Obj | None:
        """Merge-patch the status; with `resource_version`, only if the object is still at
        that version (else Conflict). None if the object is gone."""
        body: Obj = {"status": dict(status)}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            return self._custom.patch_namespaced_custom_object_status(
                wk.GROUP, wk.VERSION, namespace, wk.PLURAL, name, body)
        except kubernetes.client.ApiException as exc:
            if _missing(exc):
                return None
            if exc.status == 409:
                raise Conflict(f"OverlayJob {namespace}/{name} changed since resourceVersion {resource_version}") from None
            raise

    def delete_overlayjob(self, namespace: str, name: str, *, uid: str, resource_version: str | None = None) -> bool:
        """Delete (ttlSecondsAfterFinished) only the object with this uid (a re-created
        namesake is left alone) and, if given, at this resourceVersion; False if absent or
        the precondition failed."""
        options = kubernetes.client.V1DeleteOptions(
            preconditions=kubernetes.client.V1Preconditions(uid=uid, resource_version=resource_version))
        try:
            self._custom.delete_namespaced_custom_object(wk.GROUP, wk.VERSION, namespace, wk.PLURAL, name, body=options)
            return True
        except kubernetes.client.ApiException as exc:
            if _missing(exc) or exc.status == 409:
                return False
            raise

    # --- Jobs: create, get, delete ----------------------------------------------------------------
    def create_job(self, job: Obj) -> bool:
        """True if created, False if a Job of that name exists already."""
        try:
            self._batch.create_namespaced_job(job["metadata"]["namespace"], job)
            return True
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:
                return False
            raise

    def get_job(self, namespace: str, name: str) -> Obj | None:
        try:
            return self._sanitize(self._batch.read_namespaced_job(name, namespace))
        except kubernetes.client.ApiException as exc:
            if _missing(exc):
                return None
            raise

    def delete_job(self, namespace: str, name: str) -> bool:
        """Delete with background propagation (the Job's Pods go too); False if absent."""
        try:
            self._batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
            return True
        except kubernetes.client.ApiException as exc:
            if _missing(exc):
                return False
            raise

    # --- Pods: list --------------------------------------------------------------------------------
    def list_pods(self, namespace: str, selector: str) -> list[Obj]:
        pods = self._core.list_namespaced_pod(namespace, label_selector=selector)
        return [self._sanitize(p) for p in pods.items]

    # --- Leases: create, get, delete ------------------------------------------------------------------
    def create_lease(self, lease: Obj) -> bool:
        """True if created, False if the name is taken (someone holds it)."""
        try:
            self._coordination.create_namespaced_lease(lease["metadata"]["namespace"], lease)
            return True
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:
                return False
            raise

    def get_lease(self, namespace: str, name: str) -> Obj | None:
        try:
            return self._sanitize(self._coordination.read_namespaced_lease(name, namespace))
        except kubernetes.client.ApiException as exc:
            if _missing(exc):
                return None
            raise

    def delete_lease(self, namespace: str, name: str, *, uid: str | None = None,
                     resource_version: str | None = None) -> bool:
        """Delete, optionally only if the Lease object still has `uid` and is still at
        `resource_version` (preconditions: the server answers 409 otherwise -> False)."""
        options = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(
            uid=uid, resource_version=resource_version)) if uid or resource_version else None
        try:
            self._coordination.delete_namespaced_lease(name, namespace, body=options)
            return True
        except kubernetes.client.ApiException as exc:
            if _missing(exc) or exc.status == 409:
                return False
            raise
