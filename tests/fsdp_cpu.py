"""`dprope` under `accelerate launch` with FSDP on CPU processes (gloo), for tests/test_fsdp.py.

Accelerate turns FSDP on only for accelerator devices: its AcceleratorState keeps a CPU process group as MULTI_CPU
(plain data parallel) even when the launch config says FSDP (accelerate/state.py, the list of MULTI_GPU, MULTI_XPU,
... types that may become FSDP).  torch's FSDP itself runs on CPU tensors with gloo when its device is "cpu".  This
entry point lifts that one gate in this process only, then runs the real command line, so a machine without a GPU
runs the same FSDP wrapping, sharded checkpoints and collective save as a multi-GPU node.
"""

import accelerate.state as state
import torch
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # FSDP compares its compute device ("cpu") with the device it is given; Accelerate's is "cpu:0"
        self.device = torch.device("cpu")
        state.PartialState._shared_state.update(distributed_type=DistributedType.FSDP, device=self.device)


state.AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    from convert.cli import main

    main()
