"""The Kiln operator: reconciles TrainingJobs into a ConfigMap, a headless Service and one Indexed Job per attempt,
and ExportJobs (once their source TrainingJob succeeded) into a ConfigMap and one exporter Job.

Layers, outermost first (each imports only the ones below it):

- ``runner``: ``kiln operator``'s entry point; wraps ``kopf.run``.
- ``handlers``: thin handlers of kopf's and of the operator's own watches (parse -> resolve -> render -> apply
  -> status).
- ``reconcile``, ``export_reconcile``: one reconcile pass, the glue between the pure parts and the API.
- ``kube``, ``progress``, ``metrics``: the API client, the rank-0 progress poller, Prometheus.
- ``render``, ``status``, ``failures``, ``export_render``, ``export_status``: pure functions, no client, clock or
  environment reads.
- ``settings``, ``labels``, ``credentials``: configuration, the label/annotation keys, and where the API
  credentials come from (the ServiceAccount or a kubeconfig).

Nothing here imports torch or ``kiln.trainer``.
"""

import sys

# kopf imports the kubernetes package's models when it is installed (kopf._cogs.helpers.thirdparty), only to
# recognise them in kopf.adopt() and the like: the operator passes dicts, and that import costs 46 MB of memory.
# So kopf's first import, which every operator process goes through this package for, does not see it.
# Only as kiln.operator: run from the repository root, this directory also shadows the standard library's
# ``operator`` for code that imports it afresh (torch._dynamo's polyfills do, in the trainer), and that import
# must stay as empty as it always was.
if __name__ == "kiln.operator" and "kopf" not in sys.modules and "kubernetes" not in sys.modules:
    sys.modules["kubernetes"] = None  # type: ignore[assignment]  # None in sys.modules: ImportError
    try:
        import kopf  # noqa: F401
    finally:
        del sys.modules["kubernetes"]
