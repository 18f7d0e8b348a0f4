"""`rwkv_peft.cli` on accelerate's DeepSpeed path in CPU processes (gloo), for tests/training/test_deepspeed.py.

Without a GPU, accelerate takes the DeepSpeed path only for an Accelerator that is not a CPU one, and then finds no
distributed backend (every process would be rank 0 of 1). DeepSpeed itself runs ZeRO-2 and ZeRO-3 on CPU tensors
over gloo (its CPU accelerator), so this builds the training Accelerator as a non-CPU one and gives accelerate the
gloo backend it would give CPU processes; everything after that is accelerate's and DeepSpeed's own code:
``deepspeed.initialize`` with the filled config, the engine's backward and step, ZeRO partitioning and gathering,
engine checkpoints, ``get_state_dict``.

One more change: DeepSpeed's shared-memory all-reduce for CPU inference is left unbuilt. DeepSpeed compiles it with
g++ when its communication starts, training never uses it (its collectives go through torch.distributed), and
its worker once aborted a finished process at exit ("terminate called without an active exception", 1 run in
about 12).

    accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml --num_processes 2 \\
        tests/training/deepspeed_cpu_cli.py train RECIPE
"""
import importlib
import sys

from accelerate import Accelerator
from accelerate.state import PartialState

import rwkv_peft.training.loop as loop  # first: rwkv_peft's log filters are in place before deepspeed logs

# the module, not the attribute of that name (``deepspeed.comm.torch`` is also torch itself)
deepspeed_torch_comm = importlib.import_module("deepspeed.comm.torch")

_prepare_backend = PartialState._prepare_backend


def _gloo_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    return _prepare_backend(self, True, sagemaker_dp, backend)


def _make_accelerator(tc):
    return Accelerator(mixed_precision=tc.mixed_precision, cpu=False)


PartialState._prepare_backend = _gloo_backend
deepspeed_torch_comm.build_shm_op = lambda: None
loop.make_accelerator = _make_accelerator

if __name__ == "__main__":
    from rwkv_peft.cli import main
    sys.exit(main(sys.argv[1:]))
