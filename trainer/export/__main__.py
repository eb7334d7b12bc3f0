"""``python -m kiln.trainer.export [--spec FILE]``."""

import sys

from kiln.trainer.export.main import main

sys.exit(main())
