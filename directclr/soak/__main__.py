"""python -m directclr.soak (run.py)."""
import sys

from .run import main

sys.exit(main())
