"""Prints the size of every caption type: `python -m mlmjax.prompts [DATA_DIR]`; also a quick check
that a user's data folder validates."""

import sys

from mlmjax.prompts import FAMILIES, PromptSet, synthetic_set


def main(argv: list[str]) -> None:
    data_dir = argv[0] if argv else None
    for family in FAMILIES:
        ps = PromptSet.load(family, data_dir)
        for kind in ps.types:
            print(f"{family:10s} {kind:20s} {ps.count(kind):>10,d}")
        print(f"{family:10s} {'total':20s} {ps.size:>10,d}")
    synthetic = synthetic_set(data_dir)
    for kind in synthetic.types:
        print(f"{'synthetic':10s} {kind:20s} {synthetic.count(kind):>10,d}")


if __name__ == "__main__":
    main(sys.argv[1:])
