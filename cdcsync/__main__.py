"""``python -m cdcsync``."""

from cdcsync.cli.main import main

main()
