import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the flag must be set
# before the kernels are defined (imported), so it is set here, before any test imports pgdpo.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
