"""FlexLoRA factored-vs-dense SVD benchmark: a thin entry point.

The benchmark lives in :mod:`ubsmoe.bench.flexlora_svd` (importable, e.g. by a
``ubsmoe bench`` command); this script only runs its ``main``. Usage::

    python benchmarks/flexlora_svd.py --out flexlora_svd.json --repeats 3 --threads 2
"""

import sys

from ubsmoe.bench.flexlora_svd import main

if __name__ == "__main__":
    sys.exit(main())
