"""``python -m secmig``: the same as the ``secmig`` command."""

import sys

from secmig.cli import main

sys.exit(main())
