"""The least a controller can do to turn each new TrainingJob into its Job: a raw watch, one POST per job.

No validation, no ConfigMap, no status, no Events, no framework: the reference bench/cr_to_job_floor.py holds
Kiln's operator against. The Job posted is a template rendered by Kiln for one TrainingJob, renamed, so the
Job controller, the scheduler and kwok get exactly the work Kiln's Jobs give them. Run as its own process
(its own GIL, its CPU measurable), with as many threads as the operator's workers.

    python bench/floor_controller.py KUBECONFIG NAMESPACE TEMPLATE.json [--workers 48]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kiln.testing.kube import KubeClient

LABEL = "kiln.dev/training-job"


def job_for(template: dict[str, Any], name: str) -> dict[str, Any]:
    job = copy.deepcopy(template)
    meta = job["metadata"]
    meta["name"] = f"{name}-1"
    meta.pop("ownerReferences", None)  # the template's owner is another TrainingJob
    for labels in (meta.setdefault("labels", {}), job["spec"]["template"]["metadata"].setdefault("labels", {})):
        labels[LABEL] = name
    return job


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kubeconfig", type=Path)
    parser.add_argument("namespace")
    parser.add_argument("template", type=Path)
    parser.add_argument("--workers", type=int, default=48)
    args = parser.parse_args()
    template = json.loads(args.template.read_text())
    client = KubeClient(args.kubeconfig, pool_size=args.workers + 1)
    jobs_path = f"/apis/batch/v1/namespaces/{args.namespace}/jobs"
    pool = ThreadPoolExecutor(args.workers)

    def create(name: str) -> None:
        try:
            client.create(jobs_path, job_for(template, name))
        except Exception as exc:  # a benchmark's controller reports and goes on
            print(f"create {name}: {exc}", file=sys.stderr, flush=True)

    path = f"/apis/kiln.dev/v1alpha1/namespaces/{args.namespace}/trainingjobs?watch=true&timeoutSeconds=3600"
    response = client._pool.request("GET", client.server + path, headers=client._headers, preload_content=False,
                                    timeout=None)  # fmt: skip
    print("watching", flush=True)
    buffer = b""
    for chunk in response.stream(64 * 1024):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            event = json.loads(line)
            if event["type"] == "ADDED":
                pool.submit(create, event["object"]["metadata"]["name"])


if __name__ == "__main__":
    main()
