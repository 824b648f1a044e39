from __future__ import annotations

from qrecover.cli import main

main()
