"""The Dockerfile's images, built with buildah (tools/images.sh: chroot isolation, vfs storage, a local Debian base
when no registry is reachable) and run: the operator image in every ``make test``, the multi-GB trainer image only
in the slow tier (``make test-trainer-image``, docs/development.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kiln.cli import app
from kiln.operator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "tools" / "images.sh"
DOCKERFILE = (REPO / "Dockerfile").read_text()
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# A cold build (the base, then every locked wheel) takes minutes on a busy 2-core machine; a warm one seconds.
BUILD_TIMEOUT_S = 1800


def images(*args: str, timeout: float = BUILD_TIMEOUT_S) -> str:
    done = subprocess.run(["bash", str(IMAGES), *args], capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"tools/images.sh {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match, f"Dockerfile: no ARG {name}=<default>"
    return match.group(1)


# -- what the Dockerfile promises, without building ------------------------------------------------------------------


def test_the_image_user_is_the_operators_run_as_user() -> None:
    assert int(dockerfile_arg("KILN_UID")) == Settings().run_as_user


def test_the_images_use_the_makefiles_uv() -> None:
    makefile_uv = re.search(r"^UV_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    stated = set(re.findall(r"^ARG UV_VERSION=(\S+)$", DOCKERFILE, re.MULTILINE))
    assert makefile_uv and stated == {makefile_uv.group(1)}


def test_the_default_base_is_the_public_python_image() -> None:
    assert dockerfile_arg("BASE_IMAGE") == "docker.io/library/python:3.11-slim"


def test_kiln_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"kiln {VERSION}"


# -- the operator image ------------------------------------------------------------------------------------------------


def image_config(target: str) -> dict[str, Any]:
    inspected = json.loads(images("inspect", target))
    return inspected["OCIv1"]["config"]


@pytest.fixture(scope="module")
def operator_image() -> str:
    return images("build", "operator").strip().splitlines()[-1]


def test_operator_image_metadata(operator_image: str) -> None:
    config = image_config("operator")
    uid = Settings().run_as_user
    assert config["User"] == f"{uid}:{uid}"
    assert config["Entrypoint"] == ["kiln", "operator"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "kiln-operator"
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", labels["org.opencontainers.image.revision"])
    assert operator_image.endswith(f"kiln-operator:{VERSION}")


# Everything is checked in one container: under vfs each `buildah from` copies the whole image.
OPERATOR_PROBE = """
kiln --version
echo "--- operator help"; kiln operator --help
echo "--- uid $(id -u)"
for tool in uv gcc cc make git; do command -v "$tool" >/dev/null && echo "--- found $tool"; done
for path in /opt/kiln/bin/pip /tmp/uv /tmp/dist /src; do test -e "$path" && echo "--- found $path"; done
python -c 'import importlib.util as u; print("--- torch", u.find_spec("torch") is not None)'
"""


def test_operator_image_runs_kiln_as_non_root_without_build_tools(operator_image: str) -> None:
    output = images("run", "operator", "sh", "-c", OPERATOR_PROBE, timeout=600)
    assert output.splitlines()[0] == f"kiln {VERSION}"
    assert "Run the TrainingJob operator" in output.split("--- operator help", 1)[1]
    assert f"--- uid {Settings().run_as_user}" in output
    assert "--- found" not in output, "the final stage must hold no build tools and no sources"
    assert "--- torch False" in output


# -- the trainer image (slow tier) ---------------------------------------------------------------------------------

TRAINER_TIER = pytest.mark.skipif(
    os.environ.get("KILN_TEST_TRAINER_IMAGE") != "1",
    reason="trainer image (multi-GB): slow tier, run with `make test-trainer-image`",
)


# Inside the trainer image: the libraries import, then `kiln run` trains examples/digits.yaml for one epoch on the
# digits written there ($1 is the manifest, as JSON).
TRAINER_PROBE = """
python -c 'import torch, timm, segmentation_models_pytorch, albumentations, onnxruntime
print("--- imports", torch.__version__, timm.__version__, onnxruntime.__version__)'
python -c 'from pathlib import Path; from kiln.trainer.demo import materialize; materialize(Path("/tmp/digits"))'
printf '%s' "$1" > /tmp/digits.yaml
cd /tmp && kiln run /tmp/digits.yaml && echo "--- trained"
"""


def one_epoch_manifest() -> str:
    manifest = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    manifest["spec"]["epochs"] = 1
    # The example warms up for one epoch, and a warm-up must be shorter than the run (kiln validate refuses it).
    manifest["spec"]["scheduler"]["warmupEpochs"] = 0
    manifest["spec"]["data"]["train"]["uri"] = "/tmp/digits/train"
    manifest["spec"]["data"]["val"]["uri"] = "/tmp/digits/val"
    return json.dumps(manifest)


# Under vfs the trainer image's 6.7 GB environment exists three times while its layer is committed (the working
# container, buildah's temporary copy under /var/tmp, the new layer), and once more per metadata instruction after
# it until the build prunes them: free space fell by 41 GB at the peak (docs/benchmarks.md).
TRAINER_FREE_DISK_GB = 45


@TRAINER_TIER
def test_trainer_image_builds_and_trains_one_epoch() -> None:
    free_gb = min(shutil.disk_usage(path).free for path in (Path.home(), Path("/var/tmp"))) / 1e9
    assert free_gb >= TRAINER_FREE_DISK_GB, (
        f"the trainer image needs about {TRAINER_FREE_DISK_GB} GB free under vfs storage; {free_gb:.0f} GB is"
    )
    started = time.monotonic()
    images("build", "trainer", timeout=3600)
    build_s = time.monotonic() - started
    config = image_config("trainer")
    assert config["User"] == f"{Settings().run_as_user}:{Settings().run_as_user}"
    assert config["Entrypoint"] == ["torchrun"]
    output = images("run", "trainer", "sh", "-c", TRAINER_PROBE, "probe", one_epoch_manifest(), timeout=1800)
    print(f"trainer image: {images('size', 'trainer').strip()}, built in {build_s:.0f} s")
    assert "--- imports" in output and "--- trained" in output
