"""``python -m kiln.trainer.evaluate``: one checkpoint evaluated on one dataset, the child process of ``kiln evaluate``.

The checkpoint's own ResolvedTrainingJob becomes an evaluation job (``epochs: 0``, ``checkpoint.resume`` the
state.pt, the dataset as ``data.val`` or ``data.test``, outputs under ``--output``), written to
``<output>/trainingjob.json`` and run through the trainer's entry point in this process, exactly as a pod runs an
``epochs: 0`` TrainingJob. So the laptop and the cluster evaluate with one code path.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kiln.api.contract import Env, ExitCode, TrainerReport
from kiln.api.data import FORMATS_BY_TASK
from kiln.api.resolve import ResolvedTrainingJob
from kiln.api.runtime import StorageSpec
from kiln.trainer.errors import InvalidInput, one_line
from kiln.trainer.evaluation import read_state
from kiln.trainer.progress import write_termination_log
from kiln.trainer.train import main as train_main

log = logging.getLogger("kiln.trainer.evaluate")

SPEC_FILE, TERMINATION_FILE = "trainingjob.json", "termination-log"


def evaluation_job(
    stored: dict[str, Any], checkpoint: str, *, data: str, split: str, data_format: str | None, output: str,
    endpoint_url: str | None = None,
) -> ResolvedTrainingJob:  # fmt: skip
    """The evaluation job for ``checkpoint``, whose stored ResolvedTrainingJob is ``stored``; InvalidInput when the
    data's format is not one the checkpoint's task reads (a checkpoint of another task than the data)."""
    try:
        job = ResolvedTrainingJob.model_validate(stored)
    except ValidationError as exc:
        raise InvalidInput(f"--checkpoint: {checkpoint}: its training spec is not one this Kiln reads: "
                           f"{exc.errors()[0]['msg']}") from exc  # fmt: skip
    task, sources = job.spec.task, job.spec.data
    stored_format = (getattr(sources, split) or sources.val or sources.test or sources.train).format
    fmt = data_format or stored_format
    if fmt not in FORMATS_BY_TASK[task]:
        readers = ", ".join(name for name, formats in FORMATS_BY_TASK.items() if fmt in formats)
        raise InvalidInput(
            f"--data: {data} is {fmt} data ({readers}), but {checkpoint} is a {task} checkpoint "
            f"({task} reads {', '.join(FORMATS_BY_TASK[task])})"
        )
    document = job.model_dump(mode="json", by_alias=True)
    spec = document["spec"]
    spec["epochs"] = 0
    spec["data"].update({"val": None, "test": None, "valSplit": None, split: {"uri": data, "format": fmt}})
    spec["checkpoint"].update({"resume": checkpoint, "uri": f"{output}/checkpoints"})
    spec["output"]["uri"] = output
    spec["model"]["pretrained"] = None  # the checkpoint's weights replace it
    spec["earlyStopping"] = None  # nothing is trained
    spec["tracking"]["mlflow"] = None  # an evaluation is not a step of the training run's MLflow run
    spec["storage"] = {"endpointUrl": endpoint_url} if endpoint_url else {}  # this machine's, not the pods'
    spec["resources"].update({"nodes": 1, "procsPerNode": 1})
    document.update({"uid": None, "earlyStoppingMetric": None, "nodes": 1, "procsPerNode": 1, "worldSize": 1,
                     "runUri": output, "checkpointUri": f"{output}/checkpoints", "mode": "local"})  # fmt: skip
    try:
        return ResolvedTrainingJob.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise InvalidInput(f"evaluation job: {where}: {error['msg']}") from exc


def _storage(endpoint_url: str | None) -> StorageSpec | None:
    try:
        return StorageSpec.model_validate({"endpointUrl": endpoint_url}) if endpoint_url else None
    except ValidationError as exc:
        raise InvalidInput(f"--endpoint-url: {endpoint_url}: {exc.errors()[0]['msg']}") from exc


def evaluate_one(checkpoint: str, output: Path, args: argparse.Namespace) -> int:
    """One evaluation; its report (the termination message) goes to ``<output>/termination-log``."""
    termination_log = str(output / TERMINATION_FILE)
    os.environ[Env.TERMINATION_LOG] = termination_log  # where the trainer's entry point writes it
    try:
        storage = _storage(args.endpoint_url)
        url, state = read_state(checkpoint, storage, field="--checkpoint")
        job = evaluation_job(state["spec"], url, data=args.data, split=args.split, data_format=args.format,
                             output=str(output), endpoint_url=args.endpoint_url)  # fmt: skip
    except Exception as exc:  # the trainer's rule: InvalidInput is exit 2 in one line, anything else exit 1
        code = ExitCode.INVALID if isinstance(exc, InvalidInput) else ExitCode.FAILED
        print(f"{'invalid input' if code == ExitCode.INVALID else 'evaluation failed'}: {one_line(exc)}",
              file=sys.stderr)  # fmt: skip
        output.mkdir(parents=True, exist_ok=True)
        write_termination_log(termination_log, TrainerReport.failure(one_line(exc), code).to_json())
        return code
    output.mkdir(parents=True, exist_ok=True)
    spec_path = output / SPEC_FILE
    spec_path.write_text(job.model_dump_json(by_alias=True, indent=1))
    return train_main(["--spec", str(spec_path)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.trainer.evaluate", description=__doc__)
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="a state.pt, a checkpoint folder or a checkpoint root; repeatable")  # fmt: skip
    parser.add_argument("--output", type=Path, action="append", required=True,
                        help="a local folder for the outputs, one per --checkpoint")  # fmt: skip
    parser.add_argument("--data", required=True, help="the dataset: a local path or s3:// URI")
    parser.add_argument("--split", choices=("val", "test"), default="test", help="the split it stands for")
    parser.add_argument("--format", help="its layout; by default the checkpoint's for that split")
    parser.add_argument("--endpoint-url", help="the S3 endpoint, else AWS_ENDPOINT_URL or AWS")
    args = parser.parse_args(argv)
    if len(args.checkpoint) != len(args.output):
        parser.error("give one --output per --checkpoint")
    # One process for every checkpoint: torch and the libraries are imported once, not once per checkpoint.
    pairs = zip(args.checkpoint, args.output, strict=True)
    codes = [evaluate_one(checkpoint, output.absolute(), args) for checkpoint, output in pairs]
    return next((code for code in codes if code != ExitCode.OK), ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
