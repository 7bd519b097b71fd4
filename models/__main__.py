"""``python -m models [--num-classes 19] [names ...]``: print parameter counts vs the paper's Table 4."""

import argparse

from .segmentation import format_parameter_table, parameter_table


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    parser.add_argument("names", nargs="*", help="model names (default: all)")
    parser.add_argument("--num-classes", type=int, default=19)
    args = parser.parse_args(argv)
    print(f"parameters with {args.num_classes} classes (aux head excluded from 'params', as at inference)")
    print(format_parameter_table(parameter_table(args.num_classes, args.names or None)))


if __name__ == "__main__":
    main()
