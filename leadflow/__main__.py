"""`python -m leadflow`: the command line (how `leadflow up` starts its roles)."""

from leadflow.cli import main

main()
