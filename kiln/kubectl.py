"""The cluster, as ``kubectl kiln`` sees it: kubectl run as a subprocess.

kubectl, not the kubernetes Python client: a kubectl plugin runs where kubectl is, with the user's kubeconfig,
contexts, exec credential plugins and proxies already working, and the core stays free of the client library
(the operator extra). Every call passes on the global flags the plugin was given (``--namespace``,
``--context``, ``--kubeconfig``), as kubectl hands a plugin its remaining arguments verbatim.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kiln.api.base import GROUP

Obj = dict[str, Any]
TRAININGJOB = f"trainingjobs.{GROUP}"
"""The resource by its full name, so no other CRD's short name (``tj``) can shadow it."""


class KubectlError(Exception):
    """kubectl failed; the message is its own last line of stderr."""

    def __init__(self, message: str, *, not_found: bool = False) -> None:
        super().__init__(message)
        self.not_found = not_found


@dataclass(frozen=True)
class Kubectl:
    namespace: str | None = None
    context: str | None = None
    kubeconfig: str | None = None
    binary: str = "kubectl"

    def argv(self, *args: str) -> list[str]:
        path = shutil.which(self.binary)
        if path is None:
            raise KubectlError(f"{self.binary} is not on PATH (kubectl kiln runs kubectl for every call)")
        flags = [f"--{k}={v}" for k, v in (("namespace", self.namespace), ("context", self.context),
                                            ("kubeconfig", self.kubeconfig)) if v]  # fmt: skip
        return [path, *flags, *args]

    def run(self, *args: str, stdin: str | None = None) -> str:
        """kubectl's stdout; KubectlError with its reason when it fails."""
        done = subprocess.run(self.argv(*args), input=stdin, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            reason = lines[-1] if lines else f"kubectl {' '.join(args)} exited with {done.returncode}"
            raise KubectlError(reason.removeprefix("error: "), not_found="NotFound" in done.stderr)
        return done.stdout

    def get_json(self, *args: str) -> Obj:
        document: Obj = json.loads(self.run("get", *args, "-o", "json"))
        return document

    def trainingjob(self, name: str) -> Obj:
        return self.get_json(TRAININGJOB, name)

    def annotate(self, name: str, key: str, value: str) -> None:
        self.run("annotate", TRAININGJOB, name, f"{key}={value}", "--overwrite")

    def merge_patch(self, name: str, patch: Obj) -> None:
        self.run("patch", TRAININGJOB, name, "--type=merge", "-p", json.dumps(patch))

    def pods(self, selector: str) -> list[Obj]:
        items: list[Obj] = self.get_json("pods", "-l", selector)["items"]
        return items

    def stream(self, *args: str) -> subprocess.Popen[str]:
        """A long-running kubectl (``logs -f``): its stdout as text lines, stderr kept apart for the reason."""
        return subprocess.Popen(
            self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1
        )


def lines_of(process: subprocess.Popen[str]) -> Iterator[str]:
    assert process.stdout is not None
    for line in process.stdout:
        yield line.rstrip("\n")
