"""`python -m tensorpulse` is the `tensorpulse` command."""

from .cli import main

main()
