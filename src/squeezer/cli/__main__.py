"""``python -m squeezer.cli`` (as torchrun runs it)."""

import sys

from . import main

sys.exit(main())
