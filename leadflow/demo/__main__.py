"""`python -m leadflow.demo`: the demo feeder (started by `leadflow up --demo`)."""

from leadflow.demo import main

main()
