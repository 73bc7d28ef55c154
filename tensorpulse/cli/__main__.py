"""`python -m tensorpulse.cli` is the `tensorpulse` command, as `python -m tensorpulse` is."""

from . import main

main()
