"""``python -m koubou_mcp`` is the ``koubou-mcp`` command."""

import sys

from koubou_mcp.cli import main

sys.exit(main())
