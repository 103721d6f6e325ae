"""``python -m hf_paged.serve``: the OpenAI-compatible server, standalone (same options as ``hf-paged serve``)."""

import sys

from .cli import main

sys.exit(main())
