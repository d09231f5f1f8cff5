"""Launched by test_optim as two processes (torchrun, gloo): Muon's Newton-Schulz shared between the processes
(optim.orthogonalise) gives each of them the whole stack, bit for bit what one process computes alone, for
stacks of fewer, as many and more matrices than processes, wide and tall."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hf_gpt.optim import newton_schulz, orthogonalise  # noqa: E402

dist.init_process_group("gloo")
generator = torch.Generator().manual_seed(0)  # the same updates on both processes, as DDP leaves them
for count, shape in ((1, (6, 4)), (2, (4, 6)), (3, (6, 4)), (5, (8, 8))):
    updates = list(torch.randn(count, *shape, generator=generator).unbind(0))
    shared = orthogonalise(updates)
    assert shared.shape == (count, *shape), (count, shape, shared.shape)
    assert torch.equal(shared, newton_schulz(torch.stack(updates))), (count, shape)
print(f"process {dist.get_rank()}: every stack as one process computes it")
dist.destroy_process_group()
