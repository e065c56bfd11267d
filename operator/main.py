"""Entry point of the sifoverlay operator: `kopf run --standalone --all-namespaces operator/main.py`.

All logic lives in the importable package `sifoverlay.k8s`; this script only registers the
handlers in kopf's current registry (kopf executes it once per run). Settings come from
the environment (see sifoverlay/k8s/config.py); the chart sets them.
"""

from sifoverlay.k8s.handlers import register

register()
