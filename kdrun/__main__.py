"""`python -m kdrun ...` is the same as `kdrun ...` (handy under torchrun)."""
from kdrun.cli.main import main

main()
