"""``python -m pgtls_helpers``: the same as the ``pgtls`` console script."""

from __future__ import annotations

import sys

from pgtls_helpers.cli import main

sys.exit(main())
