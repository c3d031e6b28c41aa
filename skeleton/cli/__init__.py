"""Thin command-line entry points: each module parses arguments and calls the library.

The library never imports from here, so it stays usable from notebooks and other programs without
argparse, ``sys.exit`` or printing; a command is a few lines over functions that are tested directly.
Run one as ``python -m skeleton.cli.<name>`` or through its console script.
"""
