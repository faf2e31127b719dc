"""`python -m dalle_ds.cli COMMAND ...`, the same as the `dalle-ds` console script."""

from dalle_ds.cli import main

main()
