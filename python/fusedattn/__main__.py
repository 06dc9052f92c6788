"""`python -m fusedattn ...` is the `fusedattn` console script (see cli.py)."""

from .cli import main

raise SystemExit(main())
