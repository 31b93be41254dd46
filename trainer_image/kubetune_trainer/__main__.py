"""Entry point of every rank: `torchrun -m kubetune_trainer --config FILE` (see recipe.py)."""

import sys

from kubetune_trainer.launch import main

sys.exit(main())
