"""`python -m kdrun.cli ...` is the same as `kdrun ...`."""
from kdrun.cli.main import main

main()
