"""``make demo``: train on scikit-learn's bundled handwritten digits with ``kiln run``, two CPU processes.

The 1,797 real 8x8 scans ship inside scikit-learn, so nothing is downloaded. They are written out as an
imagefolder dataset (80/20 stratified train/val split) under ``.kiln/data/digits``, then
``examples/digits.yaml`` runs exactly as a user's manifest would. The target: at least 97 % validation
accuracy in at most 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "examples" / "digits.yaml"
DATA = ROOT / ".kiln" / "data" / "digits"
RUN = ROOT / ".kiln" / "local" / "digits"
TARGET_ACCURACY, TARGET_SECONDS = 0.97, 180.0


def materialize(dest: Path = DATA, *, seed: int = 0) -> Path:
    """Write the digits as PNGs: dest/{train,val}/<digit>/<index>.png. Idempotent."""
    marker = dest / ".complete"
    if marker.exists():
        return dest
    # Imported only to write the folders: scikit-learn pulls in scipy and pandas, seconds of start-up that every
    # later `make demo` would pay for nothing (docs/benchmarks.md, demo against timm).
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    shutil.rmtree(dest, ignore_errors=True)
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 gray levels -> 0..255
    indices = np.arange(len(images))
    train, val = train_test_split(indices, test_size=0.2, random_state=seed, stratify=digits.target)
    for split, chosen in (("train", train), ("val", val)):
        for index in chosen:
            folder = dest / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index], mode="L").save(folder / f"{index:04d}.png")
    marker.touch()
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.trainer.demo", description=__doc__)
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help="another digits manifest (bench/)")
    args = parser.parse_args(argv)
    from kiln.local import run_manifest

    data = materialize()
    print(f"digits: {sum(1 for _ in data.rglob('*.png'))} images in {data}")
    # A fresh run every time: the demo measures training from scratch, not a resume.
    shutil.rmtree(RUN, ignore_errors=True)
    started = time.monotonic()
    code = run_manifest(args.manifest, cwd=ROOT)
    seconds = time.monotonic() - started
    if code != 0:
        print(f"demo failed: kiln run exited {code}", file=sys.stderr)
        return code
    summary = json.loads((RUN / "summary.json").read_text())
    accuracy = summary["evaluation"]["metrics"]["accuracy"]
    print(f"\nval accuracy (best checkpoint): {accuracy:.2%} in {seconds:.0f}s")
    print(f"  checkpoints: {summary['checkpoints'].get('best')}")
    print(f"  metrics:     {RUN / 'metrics.jsonl'}  and  {RUN / 'summary.json'}")
    print(f"  predictions: {summary.get('predictions')}")
    ok = accuracy >= TARGET_ACCURACY and seconds <= TARGET_SECONDS
    print(f"target >= {TARGET_ACCURACY:.0%} in <= {TARGET_SECONDS:.0f}s: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
