"""`python -m vlmfit`: the command line (what `vlmfit launch` starts on each rank)."""

from vlmfit.cli import main

main()
