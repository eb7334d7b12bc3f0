"""Where the operator's idle memory goes: the resident set a fresh interpreter adds with each layer it imports.

Issue 13 asks for the operator's peak RSS at or below Kubeflow's training-operator (57 to 59 MB in
bench/operator_vs_kubeflow.py). This measures how much of Kiln's is spent before the operator does anything: each
layer is imported in turn in a new interpreter (so nothing is shared with this process) and VmRSS is read after
it. The layers follow the operator's own import order: the standard library's ssl (the apiserver is TLS), pydantic,
the API models (kiln.api), the operator with kopf and aiohttp (kiln.operator.handlers), then the command line
that starts it (kiln.cli: the image's entry point is `kiln operator`).

    .venv/bin/python bench/operator_import_rss.py
"""

from __future__ import annotations

import json
import subprocess
import sys

LAYERS = ("ssl", "pydantic", "kiln.api", "kiln.operator.handlers", "kiln.cli")

_CHILD = """
import importlib, json, sys
def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))
readings = [("interpreter", rss_mb())]
for layer in sys.argv[1:]:
    importlib.import_module(layer)
    readings.append((layer, rss_mb()))
print(json.dumps(readings))
"""


def main() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD, *LAYERS], check=True, capture_output=True, text=True).stdout
    readings = json.loads(out)
    before = readings[0][1]
    print(f"{'layer':28s} {'RSS after, MB':>14s} {'added, MB':>10s}")
    for layer, rss in readings:
        print(f"{layer:28s} {rss:14.1f} {rss - before:10.1f}")
        before = rss


if __name__ == "__main__":
    main()
