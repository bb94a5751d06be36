"""`python -m splitserve.bench ...`: the same as `splitserve bench ...`."""

from splitserve.bench.cli import main

raise SystemExit(main())
