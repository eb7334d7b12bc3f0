"""The Kiln operator: reconciles TrainingJobs into a ConfigMap, a headless Service and one Indexed Job per attempt,
and ExportJobs (once their source TrainingJob succeeded) into a ConfigMap and one exporter Job.

Layers, outermost first (each imports only the ones below it):

- ``runner``: ``kiln operator``'s entry point; wraps ``kopf.run``.
- ``handlers``: thin kopf handlers (parse -> resolve -> render -> apply -> status).
- ``reconcile``, ``export_reconcile``: one reconcile pass, the glue between the pure parts and the API.
- ``kube``, ``progress``, ``metrics``: the API client, the rank-0 progress poller, Prometheus.
- ``render``, ``status``, ``failures``, ``export_render``, ``export_status``: pure functions, no client, clock or
  environment reads.
- ``settings``, ``labels``: configuration and the label/annotation keys.

Nothing here imports torch or ``kiln.trainer``.
"""
