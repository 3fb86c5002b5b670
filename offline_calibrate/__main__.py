"""`python -m offline_calibrate ...` is `glowq-calibrate ...`."""

from .cli import calibrate_main

calibrate_main()
