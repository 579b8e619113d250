"""``python -m mpistyle`` = the ``mpistyle`` command."""

import sys

from .cli import main

sys.exit(main())
