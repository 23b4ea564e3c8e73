"""``python -m frcnn``: the ``frcnn`` command, also as ``torchrun --nproc-per-node N -m frcnn train ...``."""

import sys

from frcnn.cli import main

sys.exit(main())
