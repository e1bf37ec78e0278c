"""Suite-wide settings."""
import os

import torch

# The tiny test models run many small ops: one thread avoids OpenMP spin-waits that cost far more than the math
# on a 2-core machine (and that explode when other processes share it).
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels can only run in its interpreter, and Triton picks the mode when a kernel module is
# imported: set it before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
