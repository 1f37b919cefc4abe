import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# `make test` runs two pytest workers (pytest -n 2): one thread each, so together they use the 2 cores
# without oversubscribing them; a plain `pytest` run uses both cores in its one process.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
