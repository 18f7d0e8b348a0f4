"""`rwkv_peft.cli` on accelerate's FSDP2 path in CPU processes (gloo), for tests/training/test_fsdp.py.

accelerate sends processes without a GPU down its MULTI_CPU (DDP) path and ignores an FSDP config there
(``AcceleratorState`` turns FSDP on only for GPU-like distributed types). PyTorch's FSDP2 (``fully_shard``) itself
runs on CPU tensors over gloo, so this marks the state FSDP once it is built; everything after that is
accelerate's own FSDP2 code: ``fully_shard`` of each block, sharded ``save_state``/``load_state``,
``get_state_dict``, ``no_sync``, DTensor-aware gradient clipping.

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 \\
        tests/training/fsdp_cpu_cli.py train RECIPE
"""
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later AcceleratorState() copy it
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_fsdp_on_cpu

if __name__ == "__main__":
    from rwkv_peft.cli import main
    sys.exit(main(sys.argv[1:]))
