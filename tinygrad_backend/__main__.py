import sys

from tinygrad_backend.cli import main

if __name__ == "__main__":  # kernel search (--beam) spawns worker processes that import this module again
    sys.exit(main())
