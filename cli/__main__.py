"""`python -m cli ...` is `flock ...` (used where the console script may not be on PATH)."""

from cli import main

raise SystemExit(main())
