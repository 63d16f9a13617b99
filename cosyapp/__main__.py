"""`python -m cosyapp ...` is the same as the `cosyapp` command."""

from cosyapp.cli import main

main()
