"""FlexLoRA factored-vs-dense SVD benchmark: a thin entry point.

The benchmark lives in :mod:`ubsmoe.metrics.flexlora_bench` (importable, e.g. by a
``ubsmoe bench`` command); this script only runs its ``main``. Usage::

    python benchmarks/flexlora_svd.py --out flexlora_svd.json --repeats 3 --threads 2
"""

import sys

from ubsmoe.metrics.flexlora_bench import main

if __name__ == "__main__":
    sys.exit(main())
