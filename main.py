"""lit-hsa command line: ``python main.py {fit,validate} --config configs/tiny.yaml [dotted.key=value ...]``."""
import sys

from lit_hsa.cli import main

if __name__ == "__main__":
    sys.exit(main())
