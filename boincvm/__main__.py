"""``python -m boincvm``."""

from boincvm.cli import main

main()
