"""CPU per apiserver request: the operator's transport (operator/transport.py) against urllib3's PoolManager.

Both send the same requests to the same real kube-apiserver (a fresh harness control plane), one at a time over one
kept-alive TLS connection with the same TLS context and credentials, and decode the JSON answer; what differs is
only the HTTP layer. Reported: this process's CPU microseconds per request (time.process_time, which leaves out
the apiserver's own work) and the wall time, for a GET of a TrainingJob and a merge PATCH of its status, and
transport/urllib3 as a ratio (below 1: the transport is cheaper). The operator sends about ten such requests per
TrainingJob from threads that share one GIL, so the CPU per request bounds how fast it gets through a burst.

    .venv/bin/python bench/apiserver_request_cost.py [--requests 500]
"""

from __future__ import annotations

import argparse
import functools
import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import urllib3
from operator_scale import NAMESPACE, REPO, create_namespace, trainingjob

from kiln.operator import credentials as creds
from kiln.operator.kube import MERGE_PATCH, load_api_client
from kiln.testing.controlplane import ControlPlane, ControlPlaneConfig


def per_request(send: Callable[[], object], requests: int) -> dict[str, float]:
    for _ in range(20):  # the connection opened, the code paths warm
        send()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(requests):
        send()
    return {
        "cpu_us": round((time.process_time() - cpu) / requests * 1e6),
        "wall_us": round((time.perf_counter() - wall) / requests * 1e6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    cluster = ControlPlane(ControlPlaneConfig(fake_gpu_nodes=1, executor=False)).start()
    try:
        cluster.install_crds(sorted((REPO / "crds").glob("*.yaml")))
        create_namespace(cluster, NAMESPACE)
        cluster.kube.create(f"/apis/kiln.dev/v1alpha1/namespaces/{NAMESPACE}/trainingjobs", trainingjob("cost"))
        credentials = creds.from_kubeconfig(Path(cluster.kubeconfig))
        api, auth = load_api_client(4, credentials), credentials.auth()
        connections, manager = api.connections(auth), api.pool(auth)  # one TLS context, as the operator's
        base = credentials.endpoint.server
        path = f"/apis/kiln.dev/v1alpha1/namespaces/{NAMESPACE}/trainingjobs/cost"
        token = {"Authorization": f"Bearer {auth.token}"} if auth.token else {}
        get_headers = {"Accept": "application/json"} | token
        patch_headers = get_headers | {"Content-Type": MERGE_PATCH}
        patch = json.dumps({"status": {"restarts": 0}}).encode()
        timeout = urllib3.Timeout(total=30.0)

        def via_urllib3(method: str, target: str, body: bytes | None, headers: dict[str, str]) -> object:
            response = manager.request(method, base + target, body=body, headers=headers, timeout=timeout)
            assert response.status == 200, response.status
            return json.loads(response.data)

        def via_transport(method: str, target: str, body: bytes | None, headers: dict[str, str]) -> object:
            response = connections.request(method, target, body, headers, 30.0)
            assert response.status == 200, response.status
            return json.loads(response.data)

        results: dict[str, dict[str, float]] = {}
        for name, client in (("urllib3", via_urllib3), ("transport", via_transport)) * 2:  # twice, interleaved
            for request, method, body, headers in (("get", "GET", None, get_headers),
                                                   ("patch_status", "PATCH", patch, patch_headers)):  # fmt: skip
                send = functools.partial(client, method, path + ("/status" if body else ""), body, headers)
                measured = per_request(send, args.requests)
                key = f"{request}_{name}"
                best = results.get(key)
                results[key] = measured if best is None or measured["cpu_us"] < best["cpu_us"] else best
        ratios = {
            f"{request}_cpu_transport_over_urllib3": round(
                results[f"{request}_transport"]["cpu_us"] / results[f"{request}_urllib3"]["cpu_us"], 2
            )
            for request in ("get", "patch_status")
        }
        print(json.dumps({"requests": args.requests, "tls": ssl.OPENSSL_VERSION, "best_of_two": results,
                          "ratios": ratios}, indent=2))  # fmt: skip
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
