"""``python -m kiln.trainer --spec FILE`` (under torchrun in a pod, or alone)."""

from kiln.trainer.exiting import exit_process
from kiln.trainer.train import main

exit_process(main())
