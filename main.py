"""lit-hsa command line: ``python main.py {fit,validate,generate,eval,experiment,merge,consolidate} ...``
(``--help``)."""
import sys

from lit_hsa.cli import main

if __name__ == "__main__":
    sys.exit(main())
