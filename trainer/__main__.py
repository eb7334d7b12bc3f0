"""``python -m kiln.trainer --spec FILE`` (under torchrun in a pod, or alone)."""

import sys

from kiln.trainer.train import main

sys.exit(main())
