"""``python -m moeflow``: the console script."""

import sys

from moeflow.cli import main

sys.exit(main())
