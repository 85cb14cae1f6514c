#!/usr/bin/env python
"""The pool simulator, runnable from a checkout: ``python tools/simulate_pool.py --help``.

The program lives in ``megatron_recycle/simulate.py`` (installed with the package, so that
``megatron-recycle simulate`` works from any install); this file only calls it.
"""

from __future__ import annotations

import sys

from megatron_recycle.simulate import main

if __name__ == "__main__":
    main(sys.argv[1:])
