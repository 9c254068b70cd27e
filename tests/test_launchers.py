"""The model's launchers (dpllama/model/kernels.py) against the kernels they launch: each Signature must list
the compiled kernel's arguments, by name and in order, for every program a model builds (both weight-format
builds, the attention program, decode's fused QKV + attention, a layer in one launch, qwen3's heads' norms); a
launcher given too few or unknown arguments fails before any launch."""
from __future__ import annotations

import copy

import pytest

from dpllama.model import kernels
from dpllama.model.llama import Llama
from dpllama.model.quant import quantize_int4
from dpllama.runtime import Queue
from dpllama.runtime.config import DeviceConfig
from tests.helpers import random_weights


def arg_info_queue(queue, layer_max_units: int) -> Queue:
    """A queue whose programs keep their argument names (and that asks for the fused attention kernel, and for a
    layer in one launch or not)."""
    values = copy.deepcopy(queue.config.values)
    values["build_options"].append("-cl-kernel-arg-info")
    values["fuse"].update(attention_min_kv_heads=1, layer_max_units=layer_max_units)
    values["work_group"].update(gemv=1, tile_rows=8, attention=1)
    return Queue(queue.device, DeviceConfig(values, "<arg-info>"), out_of_order=False)


def test_every_signature_matches_its_kernel(queue):
    w = random_weights(32, 48, 2, 4, 2, 40, 16, False, 0)
    w.layers[0].w2 = quantize_int4(w.layers[0].w2.dequantize(), 32, symmetric=False)    # a second format
    seen = set()
    for units in (0, queue.device.compute_units):      # decode's QKV + attention; matrix.cl's layer
        q = arg_info_queue(queue, units)
        model = Llama(w, q)
        assert model.fused_attention and bool(model.layers[0].layer) == bool(units)
        for prog in q.programs.values():
            for name in prog.names:
                if prog.file == "check.cl":
                    continue
                assert name in kernels.SIGNATURES, f"{prog.file}: kernel {name} has no launcher"
                assert prog.arg_names(name) == kernels.SIGNATURES[name].args, f"{prog.file}: {name}"
                seen.add(name)
    q = arg_info_queue(queue, 0)       # qwen3's heads' norms, a kernel of their own after the QKV launch
    Llama(random_weights(32, 48, 2, 4, 2, 40, 16, seed=0, rope_neox=True, qk_norm=True, key_length=16), q)
    for prog in q.programs.values():
        if "norm_rope_heads" in prog.names:
            assert prog.arg_names("norm_rope_heads") == kernels.SIGNATURES["norm_rope_heads"].args
            seen.add("norm_rope_heads")
    assert seen == set(kernels.SIGNATURES)


def test_a_launcher_needs_every_argument_and_no_other(queue):
    sig = kernels.SIGNATURES["advance"]
    with pytest.raises(TypeError, match=r"advance: missing \['n'\], unexpected \[\]"):
        sig.bind(queue, None, (1,), None, state=None)
    with pytest.raises(TypeError, match=r"advance: missing \[\], unexpected \['m'\]"):
        sig.bind(queue, None, (1,), None, state=None, n=1, m=2)
