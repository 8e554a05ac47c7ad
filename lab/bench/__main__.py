"""`python -m lab.bench`: see lab/bench/__init__.py."""

from lab.bench.runner import main

raise SystemExit(main())
