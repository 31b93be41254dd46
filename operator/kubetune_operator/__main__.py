"""`python -m kubetune_operator`: the same as `kubetune operator`."""

import sys

from kubetune_operator.main import run_operator

sys.exit(run_operator())
