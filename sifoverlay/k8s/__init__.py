"""Kubernetes integration: the OverlayJob custom resource and its kopf operator.

- `well_known`: every group, kind, label, annotation, finalizer and condition string;
- `names`: names of child objects (Jobs, Leases), always valid DNS labels;
- `builders`: pure functions returning the dicts the operator sends to the API server;
- `handlers`: the kopf handlers (imports kopf; load it with `kopf run operator/main.py`).

Importing this package does not import kopf or the kubernetes client.
"""
