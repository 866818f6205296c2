"""Entry point: ``python -m pipeline STAGE ...``."""

import sys

from pipeline.cli import main

sys.exit(main())
