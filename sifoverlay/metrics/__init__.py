"""Prometheus metrics: names (one table, prefix `sifoverlay_`), the exporter's scan and
custom collector, the HTTP exporter, node_exporter textfiles, and the event counters
that short-lived processes record (docs/metrics.md).

Needs the `metrics` extra (prometheus-client); submodules import it, this package does not.
"""
