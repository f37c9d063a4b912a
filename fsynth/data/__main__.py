"""`python -m fsynth.data`: list the registered datasets, or prepare a few-shot manifest."""

import sys

from fsynth.cli import run_main
from fsynth.data.cli import main

sys.exit(run_main(main))
