"""`python -m splitserve.plan ...`: the same as `splitserve plan ...`."""

from splitserve.plan.cli import main

raise SystemExit(main())
