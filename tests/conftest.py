"""Suite-wide settings."""
import os

import torch

# The tiny test models run many small ops: one thread avoids OpenMP spin-waits that cost far more than the math
# on a 2-core machine (and that explode when other processes share it).
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
