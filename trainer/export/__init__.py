"""The exporter: a Kiln checkpoint to verified, benchmarked ONNX / torch.export / TorchScript artifacts.

``python -m kiln.trainer.export [--spec PATH]`` is the ExportJob pod's entry point (``kiln.api.contract``
states what it reads and writes); ``kiln export`` runs the same command on a laptop. The modules, in the
order a run uses them: ``source`` (checkpoint to network), ``tasks`` (what differs per task), ``inputs``
(validation images or random ones), ``formats`` (export and load back), ``card`` (the model card),
``measure`` (verification and benchmark), ``quantize`` (onnxruntime int8), ``pipeline`` (the outline) and
``main`` (exit codes and the report).
"""
