"""``python -m pipeline <stage> --run results/<run> [--set key.sub=value ...]``."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
