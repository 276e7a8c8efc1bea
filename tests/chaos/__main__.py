"""`python -m tests.chaos`: one fault-injection run and its report (see tests/chaos/run.py)."""

import sys

from tests.chaos.run import main

sys.exit(main())
