import sys

from tinygrad_backend.cli import main

sys.exit(main())
