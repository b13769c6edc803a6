"""``python -m llamaduo.cli``: the same as the ``llamaduo`` command."""

import sys

from llamaduo.cli.main import main

sys.exit(main())
