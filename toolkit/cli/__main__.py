"""`python -m toolkit.cli`: the same as the `deploy` console script."""

import sys

from .main import main

sys.exit(main())
