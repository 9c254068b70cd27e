"""The whole device forward pass (dpllama.model.llama.Llama) against the NumPy reference, token by token and
in batched prefill chunks, under the shipped config and under others (GPU-like launch geometry on this device);
the upstream run.c greedy oracle for stories260K; and the sampler."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from dpllama.errors import DpllamaError
from dpllama.formats import round_up
from dpllama.generate import Sampler, XorShift, generate
from dpllama.model.llama import Llama, Part
from dpllama.model.gguf import load_gguf
from dpllama.model.llama2c import load_llama2c
from dpllama.model.quant import quantize_int4, quantize_q8
from dpllama.model.reference import Reference
from dpllama.model.weights import Layer, Tensor, Weights, llama3_rope_factors, yarn_rope
from dpllama.runtime import Queue
from dpllama.runtime.config import dump_config, parse_config
from dpllama.quantize import GROUPS
from tests.helpers import (EVERY_TYPE, EVERY_TYPE_SHAPE, LLAMA_CPP_MODELS, ORACLES, llama2c_dir, quantize_cli,
                           random_llama2c, random_weights, tiny_qwen3, write_test_gguf)

# Awkward shapes: hidden 100 is a multiple of neither 8 nor 32, dim 48 not of 32 or 64, head_dim 8, GQA 3:1.
SHAPE = dict(dim=48, hidden=100, n_layers=2, n_heads=6, n_kv_heads=2, vocab=97, seq_len=32)
STEPS = 10
# Logits: both sides compute the same float32 math (the same dequantized weights) in different summation
# orders. Each step passes ~12 sums of <= 100 terms (relative error <= ~100 x 6e-8 of their magnitudes,
# typically ~1e-6) through two layers. Measured: <= 2e-6 of the largest logit (PoCL CPU); 1e-4 of the
# largest logit leaves headroom and still catches any wrong element, position or scale.
LOGITS_RTOL = 1e-4
# Quantized matrices multiply their input rounded to 16-bit steps (1/32767 of each group's max |x|). The kernel
# rounds x * g before the RMS scale (and may fuse the multiply-add of its rounding, by target), the reference
# rounds rmsnorm(x): an element within float rounding of a half step can land one step apart, which moves a
# product by |w| * max|x_g| / 32767, ~3e-5 of its largest term. A step passes ~9 quantized products (two
# layers and the head), so 5e-4 of the largest logit allows ~16 such flips reaching one logit, and is still
# far below what a wrong element, position or scale gives (order 1). Measured: 1.1e-4 on AVX2 and on AVX-512
# without VNNI (PoCL 3.0 and 3.1), 2e-6 where the compiler rounds as NumPy does.
QUANT_LOGITS_RTOL = 5e-4
# With 8-bit activations (int4 and int5 matrices, --activation-bits 8) a step is 1/127 of max |x|, so a flip moves
# a product 258x more, and it is ~258x rarer (float rounding of x * 127 / max|x| reaches a half step's edge 258x
# less often than of x * 32767 / max|x|). Measured: 5.2e-4 of the largest logit on the every-type model (PoCL
# 3.1, AVX-512); a reference that rounds to 16-bit steps instead is 1e-2 away, so 3e-3 tells the two apart.
X8_LOGITS_RTOL = 3e-3


def logits_atol(weights: Weights, want: np.ndarray, activation_bits: int = 16) -> float:
    kinds = {t.kind for _, t in weights.matrices()}
    rtol = (X8_LOGITS_RTOL if activation_bits == 8 and kinds & {"int4", "int5"}
            else QUANT_LOGITS_RTOL if kinds - {"f32"} else LOGITS_RTOL)
    return rtol * np.abs(want).max()


# Other configs on the same device (validated by parse_config like a YAML file). Their programs are the ones
# test_kernels.py builds too, so a cold run compiles little more.
GPU_LIKE = dict(gemv=64, tile_rows=4, decode_tiles=1, prefill_tokens=4, prefill_chunk=5, attention=16,
                attention_positions=4)
CONFIGS = {     # name -> {section: values changed}
    # the GPU configs' geometry: 64 work-items split each row tile's columns (tree reductions), float4 tiles,
    # 16 work-items per attention head with 4 positions per vector; prompts in chunks of 5
    "gpu-like": {"work_group": GPU_LIKE},
    # the shipped geometry with prompts in chunks of 5, so a prompt spans several chunks and a partial one
    "chunked": {"work_group": dict(prefill_chunk=5)},
    # decode's attention inside the QKV launch (matrix.cl's qkv_attention), with 8-row tiles (head_dim 8) taken
    # 2 at a time, so a KV head's 3 query tiles take two runs (a layer in launches of their own: the shipped CPU
    # configs' matrix.cl layer would run decode's instead)
    "fused-attention": {"work_group": dict(tile_rows=8, decode_tiles=2, prefill_chunk=5),
                        "fuse": dict(attention_min_kv_heads=1, layer_max_units=0)},
    # every layer in its five launches, as GPUs run it
    "separate-launches": {"fuse": dict(layer_max_units=0)},
    # attention in spans of 16 positions (attention.h), so rows past position 15 fold two: in one task, or (the layer
    # launch's passes of up to 16 rows) in a task per span and one to fold them
    "short-spans": {"work_group": dict(attention_span=16)},
}


@pytest.fixture(scope="module")
def q(queue):
    return queue


def queue_with(base: Queue, changes: dict) -> Queue:
    """A queue on `base`'s device whose config is `base`'s with `changes` ({section: values}) made."""
    values = copy.deepcopy(base.config.values)
    for section, changed in changes.items():
        values[section].update(changed)
    cfg = parse_config(dump_config(values), "<test config>")
    return Queue(base.device, cfg, out_of_order=False)


@pytest.fixture(scope="module", params=list(CONFIGS))
def config_q(request, q):
    return request.param, queue_with(q, CONFIGS[request.param])


def int4_weights(w: Weights, group: int, symmetric) -> Weights:
    """Every matrix of `w` in int4 (`symmetric` True / False, or "mixed": alternating per matrix, so fused
    launches meet both kinds), the embedding in q8 (group 32); a separate classifier stays separate."""
    count = iter(range(10 ** 6))

    def quant(t: Tensor) -> Tensor:
        sym = symmetric if symmetric != "mixed" else next(count) % 2 == 0
        return quantize_int4(t.dequantize(), group, symmetric=sym)

    layers = [dataclasses.replace(L, **{f.name: quant(v) for f in dataclasses.fields(Layer)
                                        for v in [getattr(L, f.name)] if isinstance(v, Tensor)}) for L in w.layers]
    emb = quantize_q8(w.tok_embeddings.dequantize(), 32)
    return Weights(w.config, emb, layers, w.norm, emb if w.tied else quant(w.output))


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A random llama2.c checkpoint with a separate classifier, written and loaded back."""
    path = tmp_path_factory.mktemp("forward") / "random.bin"
    random_llama2c(path, **SHAPE, version=0, shared=False, seed=3)
    return load_llama2c(path)


def compare_logits(q, weights: Weights, tokens: list[int], feeds: list[int], what: str,
                   activation_bits: int = 16, kv_cache: str = "f32") -> Llama:
    """Feed `tokens` (all known) in pieces of `feeds` tokens (Llama.feed: batched prefill in chunks, or one
    token) and compare the logits after every piece, those of its last token, with the reference's.
    Returns the device model, for checks of what it holds. The KV cache is float32 unless asked: with fp16 the
    two sides' keys and values, which differ in float32's last bits, sometimes round to neighbouring fp16
    values, and those larger differences then flip the 16- and 8-bit roundings of quantized matrices' inputs
    far more often than the tolerances below allow for (test_fp16_kv_cache_matches_reference has its own)."""
    assert sum(feeds) == len(tokens)
    model = Llama(weights, q, activation_bits=activation_bits, kv_cache=kv_cache)
    ref = Reference(weights, activation_bits, kv_cache)
    model.start(tokens)
    pos = 0
    for i, n in enumerate(feeds):
        if i:
            model.next_given()                  # on to the next known token
        model.feed(n)
        for p in range(pos, pos + n):
            want = ref.forward(tokens[p], p)
        pos += n
        got = model.read_logits()
        np.testing.assert_allclose(got, want, rtol=0, atol=logits_atol(weights, want, activation_bits),
                                   err_msg=f"{what}: logits at position {pos - 1} (feeds {feeds})")
    return model


def compare_batched(q, weights: Weights, what: str, activation_bits: int = 16, kv_cache: str = "f32") -> None:
    """Three sequences in slots 2, 0 and 1 fed together in batched passes (Llama.batch), one piece of each per
    pass: pieces of 2, 1 and 3 tokens, so that prompt pieces sit beside single tokens and the rows
    whose logits are wanted (every other piece's last) are gathered from the middle of the pass; each such row
    against the reference of its own sequence. With 1 slot (pieces of 1) a pass of a single row: decode's launch,
    the fused QKV-attention one where the config fuses them. The KV cache as in compare_logits."""
    c = weights.config
    lengths, pieces, slots = (9, 4, 7), (2, 1, 3), (2, 0, 1)
    rng = np.random.default_rng(21)
    seqs = [[1] + rng.integers(0, c.vocab_size, n - 1).tolist() for n in lengths]
    refs = [Reference(weights, activation_bits, kv_cache) for _ in seqs]
    model = Llama(weights, q, slots=3, activation_bits=activation_bits, kv_cache=kv_cache)
    fed, step = [0, 0, 0], 0
    while any(f < n for f, n in zip(fed, lengths)):
        parts, wanted = [], []
        for i, (seq, piece, slot) in enumerate(zip(seqs, pieces, slots)):
            n = min(piece, lengths[i] - fed[i], model.chunk - sum(len(p.tokens) for p in parts))
            if n > 0:
                want = (step + i) % 2 == 0
                parts.append(Part(slot, fed[i], seq[fed[i]:fed[i] + n], want))
                wanted += [i] * want
        got = model.batch(parts)
        assert got.shape == (len(wanted), c.vocab_size)
        for part, i in zip(parts, [i for i in range(3) if fed[i] < lengths[i]]):
            for p in range(part.pos, part.pos + len(part.tokens)):
                ref_logits = refs[i].forward(seqs[i][p], p)
            if part.logits:
                row = got[wanted.index(i)]
                np.testing.assert_allclose(row, ref_logits, rtol=0,
                                           atol=logits_atol(weights, ref_logits, activation_bits),
                                           err_msg=f"{what}: batched logits of sequence {i} at position {p}")
            fed[i] += len(part.tokens)
        step += 1
    single = model.batch([Part(0, lengths[1], [3], True)])[0]           # one more token of sequence 1 (slot 0)
    np.testing.assert_allclose(single, refs[1].forward(3, lengths[1]), rtol=0,
                               atol=logits_atol(weights, single, activation_bits),
                               err_msg=f"{what}: a batch of one row")


VARIANTS = {
    "f32": lambda w: w,
    "f32-tied": lambda w: Weights(w.config, w.tok_embeddings, w.layers, w.norm, w.tok_embeddings),
    "int4-sym-g32": lambda w: int4_weights(w, 32, True),
    "int4-asym-g64": lambda w: int4_weights(w, 64, False),
    "int4-mixed-g32-tied": lambda w: int4_weights(
        Weights(w.config, w.tok_embeddings, w.layers, w.norm, w.tok_embeddings), 32, "mixed"),
}
FEEDS = {
    "decode": [1] * STEPS,                       # one token per forward pass, logits at every position
    "prefill": [6, 1, 1, 1, 1],                  # a prompt in one batched pass, then decode
    "long prefill": [24, 1, 1],                  # over 16 rows: the layer launch's attention in blocks (attend_rows)
}


def random_tokens(n: int, seed: int = 11) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(0, SHAPE["vocab"], n - 1).tolist()


@pytest.mark.parametrize("feeds", FEEDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_reference(q, random_model, variant, feeds):
    compare_logits(q, VARIANTS[variant](random_model), random_tokens(sum(FEEDS[feeds])), FEEDS[feeds], variant)


@pytest.mark.parametrize("variant", ["f32", "int4-sym-g32"])
def test_logits_match_reference_other_configs(config_q, random_model, variant):
    """Prompts across several chunks (12 = 5 + 5 + 2), a piece inside one chunk, and decode steps."""
    name, cq = config_q
    feeds = [12, 1, 1, 3, 1, 1]
    assert Llama(VARIANTS[variant](random_model), cq).fused_attention == name.startswith("fused")
    compare_logits(cq, VARIANTS[variant](random_model), random_tokens(sum(feeds), 5), feeds, f"{name} {variant}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_passes_match_reference(q, random_model, variant):
    compare_batched(q, VARIANTS[variant](random_model), variant)


def test_batched_passes_other_configs(config_q, random_model):
    name, cq = config_q
    compare_batched(cq, VARIANTS["int4-sym-g32"](random_model), name)


@pytest.mark.parametrize("feeds", FEEDS)
def test_8_bit_activations_match_reference(q, every_type_model, feeds):
    """--activation-bits 8: int4 and int5 matrices take bytes of x (q8 ones keep 16 bits), in decode, prefill and
    batched passes, against the reference that rounds as they do."""
    compare_logits(q, every_type_model, random_tokens(sum(FEEDS[feeds])), FEEDS[feeds], "8-bit activations", 8)
    if feeds == "prefill":
        compare_batched(q, every_type_model, "8-bit activations, batched", 8)


@pytest.fixture(scope="module")
def every_type_model(tmp_path_factory):
    """A random GGUF with a tensor of every type dpllama reads (tests/helpers.py's EVERY_TYPE: the K-quants, Q5_x,
    fused matrices of different formats), loaded."""
    path = tmp_path_factory.mktemp("every") / "every.gguf"
    write_test_gguf(path, random_weights(shared=False, seed=4, **EVERY_TYPE_SHAPE), EVERY_TYPE)
    return load_gguf(path)


@pytest.mark.parametrize("feeds", FEEDS)
def test_every_gguf_type_matches_reference(q, every_type_model, feeds):
    compare_logits(q, every_type_model, random_tokens(sum(FEEDS[feeds])), FEEDS[feeds], "every GGUF type")


def test_every_gguf_type_other_configs(config_q, every_type_model):
    name, cq = config_q
    feeds = [12, 1, 1, 3, 1, 1]
    compare_logits(cq, every_type_model, random_tokens(sum(feeds), 5), feeds, f"{name} every GGUF type")


def test_fused_attention_needs_a_kv_head_per_compute_unit(q, random_model, monkeypatch):
    """With fewer KV heads (2 here) than compute units, the fused launch's work-groups would leave some idle
    through the QKV projection: decode keeps attention in a launch of its own."""
    cq = queue_with(q, CONFIGS["fused-attention"])
    for units, fused in ((1, True), (2, True), (3, False)):
        monkeypatch.setattr(type(q.device), "compute_units", property(lambda self: units))
        assert Llama(random_model, cq).fused_attention == fused, f"{units} compute units"


def test_fused_attention_needs_single_work_item_groups(q, random_model):
    """qkv_attention exists for work-groups of one work-item; a GPU geometry asking for it runs unfused."""
    cq = queue_with(q, {"work_group": GPU_LIKE, "fuse": dict(attention_min_kv_heads=1)})
    assert not Llama(random_model, cq).fused_attention


def layer_phases(model: Llama) -> set[int]:
    """The phases the model's layers run in matrix.cl's layers launch, over all its group sizes (empty: none do)."""
    return {phases for L in model.layers for _, phases in L.layer.values()}


def layer_launches(model: Llama, T: int = 1) -> int:
    """matrix.cl's layers launches in a pass over T rows."""
    return sum(c.name == "layers" for c in model.forward_commands(T))


@pytest.mark.parametrize("variant, phases", [("int4-asym-g64", {5}), ("int4-mixed-g32-tied", {2, 3}),
                                             ("every-type", {2}), ("qwen3", {5})])
def test_layer_launch_matches_separate_launches(q, random_model, every_type_model, qwen3_tiny, variant, phases):
    """matrix.cl's layers (the layers' phases in one launch, the work-groups claiming their tasks) computes what the
    separate launches compute, bit for bit: a prompt of 27 rows (attention in blocks of rows, attention.h's
    attend_rows, the last block short), decode steps, batches of 1 to 8 rows at different positions (a row at a
    time), and one of 21 rows from three slots (blocks that span slots), attention in spans of 16 positions (rows
    past 15 fold two; the layer launch gives each its own task in passes of up to 16 rows). Where a layer's matrices
    differ in format (symmetric and asymmetric int4 in turn;
    every GGUF type), its launch runs the phases up to the first matrix of another format (QKV and attention at
    least) and the rest run on their own. Qwen3's heads' norms: a phase of the launch, or a kernel of their own."""
    weights = {"every-type": every_type_model, "qwen3": qwen3_tiny[0]}.get(variant) or VARIANTS[variant](random_model)
    spans = {"work_group": dict(attention_span=16)}     # rows past position 15 in two spans, split or not
    fused = Llama(weights, queue_with(q, {"fuse": dict(layer_max_units=q.device.compute_units), **spans}), slots=8)
    alone = Llama(weights, queue_with(q, {"fuse": dict(layer_max_units=0), **spans}), slots=8)
    if not fused.layers[0].layer:
        pytest.skip(f"the config for {q.device} has no single-work-item work-groups (matrix.cl's layers is for CPUs)")
    assert layer_phases(fused) == phases and not layer_phases(alone)
    # where every phase is in one format, one launch takes every layer; else a launch a layer
    assert layer_launches(fused) == (1 if phases == {5} else len(fused.layers))
    prompt = random_tokens(27, 3)
    for model in (fused, alone):
        model.start(prompt)
        model.feed(len(prompt))
    for step in range(3):
        for model in (fused, alone):
            model.next_given(5 + step)
            model.step()
        np.testing.assert_array_equal(fused.read_logits(), alone.read_logits(), f"decode step {step}")
    for rows in (1, 3, 8):
        parts = [Part(slot, 7 + 2 * slot, [2 + slot], True) for slot in range(rows)]
        np.testing.assert_array_equal(fused.batch(parts), alone.batch(parts), f"a batch of {rows} rows")
    for rows in (5, 7):
        parts = [Part(slot, 12, random_tokens(rows, slot), True) for slot in (1, 2, 3)]
        np.testing.assert_array_equal(fused.batch(parts), alone.batch(parts), f"a batch of 3 prompt pieces of {rows}")


def test_layer_launch_takes_a_work_group_per_usable_cpu(q, random_model, monkeypatch):
    """A process allowed fewer CPUs than the device has compute units (taskset, a container's cpuset) launches
    matrix.cl's layers with a work-group per allowed CPU: two on one CPU would wait out each other's time slices at
    every phase's end (pinned to one CPU, SmolLM2's decode ran 0.82x the separate launches' speed with two)."""
    weights = VARIANTS["int4-asym-g64"](random_model)
    cq = queue_with(q, {"fuse": dict(layer_max_units=q.device.compute_units)})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    model = Llama(weights, cq)
    if not layer_phases(model):
        pytest.skip(f"the config for {q.device} has no single-work-item work-groups (matrix.cl's layers is for CPUs)")
    [size] = {c.global_size for c in model.forward_commands(1) if c.name == "layers"}
    assert size == (1, 1)
    check_greedy(model, weights, [1, 5, 17], 4, "one work-group")


def test_layer_launches_split_where_one_allocation_cannot_hold_the_layers(q):
    """The layers a launch takes share one buffer, as many as one allocation holds (memory.max_alloc_mb): with room
    for one layer (2.3 MB of float32 weights here), each layer gets a buffer and a launch, and the logits are the
    same bits as one launch for all, and as the separate launches."""
    weights = random_weights(256, 512, 3, 4, 2, SHAPE["vocab"], 32, True, 0)
    models = [Llama(weights, queue_with(q, {"fuse": dict(layer_max_units=units), "memory": dict(max_alloc_mb=mb)}))
              for units, mb in ((q.device.compute_units, 0), (q.device.compute_units, 3), (0, 0))]
    if not layer_phases(models[0]):
        pytest.skip(f"the config for {q.device} has no single-work-item work-groups (matrix.cl's layers is for CPUs)")
    assert [len(m.layer_buffers) for m in models] == [1, 3, 0]
    assert [layer_launches(m) for m in models] == [1, 3, 0]
    prompt = random_tokens(9, 4)
    for model in models:
        model.start(prompt)
        model.feed(len(prompt))
    for step in range(3):
        for model in models:
            model.next_given(3 + step)
            model.step()
        first, *others = (model.read_logits() for model in models)
        for other in others:
            np.testing.assert_array_equal(first, other, f"decode step {step}")


def test_layer_launch_on_one_driver_thread(repo_root):
    """Where the driver runs a launch's work-groups one after the other on one thread (PoCL with one worker thread),
    the first does every task and the others find none left: matrix.cl's layers never waits on a work-group that
    has not started. stories260K's oracle, greedy, in a process with POCL_MAX_PTHREAD_COUNT=1 (bounded in time: a
    launch waiting on itself would hang)."""
    stories_weights()   # skips without the oracle files
    ids = oracle_ids("reference_stories260K_greedy_ids.txt")
    code = ("import sys; from dpllama.generate import Sampler, generate; from dpllama.loaders import load_weights; "
            "from dpllama.model.llama import Llama; from dpllama.runtime import open_queue; "
            "from tests.test_forward import layer_phases; "
            f"m = Llama(load_weights(sys.argv[1]), open_queue()); assert layer_phases(m) == {{5}}, 'no layer launch'; "
            f"print(list(generate(m, {ids[:5]}, 40, Sampler(temperature=0))))")
    run = subprocess.run([sys.executable, "-c", code, str(llama2c_dir() / "stories260K.bin")], cwd=repo_root,
                         env=dict(os.environ, POCL_MAX_PTHREAD_COUNT="1"), capture_output=True, text=True, timeout=300)
    if run.returncode and "no layer launch" in run.stderr:
        pytest.skip("the device dpllama uses here runs no layer launch (matrix.cl's layers is for CPUs)")
    assert run.returncode == 0, run.stderr[-2000:]
    assert eval(run.stdout.strip()) == ids[5:45]


def check_greedy(model: Llama, weights: Weights, prompt: list[int], n: int, what: str) -> list[int]:
    """n greedy tokens on the device (choose_embed: the argmax, and the chosen token's embedding row for the
    next pass) after a batched prompt follow the reference's logits, near-ties aside. Returns the new ids."""
    ref = Reference(weights)
    ids = list(generate(model, prompt, n, Sampler(temperature=0)))
    seq = prompt + ids
    assert len(ids) == n
    for pos in range(len(seq) - 1):
        logits = ref.forward(seq[pos], pos)
        if pos + 1 < len(prompt):
            continue
        best = int(np.argmax(logits))
        near_tie = logits[best] - logits[seq[pos + 1]] <= logits_atol(weights, logits)
        assert seq[pos + 1] == best or near_tie, f"{what}: position {pos} chose {seq[pos + 1]}, reference {best}"
    return ids


@pytest.mark.parametrize("variant", ["f32", "int4-asym-g64"])
def test_greedy_matches_reference_argmax(q, random_model, variant):
    weights = VARIANTS[variant](random_model)
    check_greedy(Llama(weights, q), weights, [1, 5, 17], STEPS + 3, variant)


def test_greedy_and_given_tokens_mixed(q, random_model):
    """A greedy step embeds its token for the next pass (which then skips its embed launch); a host-given
    token, a new prompt and a multi-token feed after it must embed again. Logits against the reference fed
    the same sequence."""
    weights = VARIANTS["int4-asym-g64"](random_model)
    model, ref = Llama(weights, q), Reference(weights)
    seq, pos = [1, 5], 0

    def check(what):
        nonlocal pos
        while pos < model.pos + 1:
            want = ref.forward(seq[pos], pos)
            pos += 1
        np.testing.assert_allclose(model.read_logits(), want, rtol=0, atol=logits_atol(weights, want),
                                   err_msg=f"after {what}, position {model.pos}")

    model.start(seq)
    model.feed(2)
    check("the prompt")
    for step, given in enumerate([None, 7, None, None, 3]):
        if given is None:
            seq.append(model.next_chosen(ahead=step % 2 == 0))
            if step % 2:
                model.step()
        else:
            seq.append(given)
            model.next_given(given)
            model.step()
        check(f"step {step} ({'greedy' if given is None else 'given'})")
    model.next_chosen()                                 # chosen and embedded, but never fed: a new turn
    seq.append(13)                                      # puts another token in its place
    model.start(seq, keep=len(seq) - 1)
    model.feed(1)
    check("a new prompt after a greedy step")
    seq += [11, 12, 14]                                 # a prompt's slots: the greedy step keeps and embeds
    model.start(seq, keep=len(seq) - 3)                 # 11, then 12 and 14 go through one 2-token pass
    model.feed(1)
    assert model.next_chosen() == 12
    model.feed(2)
    check("a 2-token feed after a greedy step")


# ---------------------------------------------------------------- stories260K and the run.c oracle

def stories_weights() -> Weights:
    d = llama2c_dir()
    for name in ("stories260K.bin", "reference_stories260K_greedy_ids.txt",
                 "reference_stories260K_greedy_noprompt_n256_ids.txt"):
        if not (d / name).is_file():
            pytest.skip(f"{d / name} not found (the stories260K oracle files)")
    return load_llama2c(d / "stories260K.bin")


@pytest.fixture(scope="module")
def stories(q):
    return Llama(stories_weights(), q)


def oracle_ids(name: str) -> list[int]:
    return [int(t) for t in (llama2c_dir() / name).read_text().split()]


def test_stories260K_greedy_with_prompt(stories):
    """run.c -t 0 -n 128 -i "Once upon a time": BOS + 4 prompt tokens, then 124 greedy tokens."""
    ids = oracle_ids("reference_stories260K_greedy_ids.txt")
    assert len(ids) == 129
    assert ids[:5] + list(generate(stories, ids[:5], 124, Sampler(temperature=0))) == ids


@pytest.mark.parametrize("config", ["gpu-like", "fused-attention"])
def test_stories260K_greedy_with_prompt_other_configs(q, config):
    """The same under the GPU-like geometry and with decode's attention fused into the QKV launch, the
    5-token prompt in chunks of 5 and then of 1."""
    ids = oracle_ids("reference_stories260K_greedy_ids.txt")
    model = Llama(stories_weights(), queue_with(q, CONFIGS[config]))
    assert model.fused_attention == (config == "fused-attention")
    assert ids[:5] + list(generate(model, ids[:5], 124, Sampler(temperature=0))) == ids


def test_stories260K_greedy_no_prompt(stories):
    """run.c -t 0 -n 256 with no prompt: BOS, then 256 greedy tokens."""
    ids = oracle_ids("reference_stories260K_greedy_noprompt_n256_ids.txt")
    assert len(ids) == 257
    assert [1] + list(generate(stories, [1], 256, Sampler(temperature=0))) == ids


# ---------------------------------------------------------------- int4 embedding / classifier, through the loader

def int4_nbytes(rows: int, cols: int, group: int, asym: bool) -> int:
    """What an int4 matrix costs: 4 bits a weight, an fp16 scale (and min) a group, over whole groups."""
    cols_p = round_up(cols, group)
    return rows * cols_p // 2 + rows * cols_p // group * 2 * (2 if asym else 1)


INT4_HEADS = [(tied, scheme, group) for tied in (True, False) for scheme in ("sym", "asym") for group in GROUPS]


@pytest.mark.parametrize("tied,scheme,group", INT4_HEADS,
                         ids=[f"{'tied' if t else 'untied'}-{s}-g{g}" for t, s, g in INT4_HEADS])
def test_keep_8bit_none_keeps_int4_embedding_and_classifier(q, tmp_path, tied, scheme, group):
    """`quantize --keep-8bit none`: the embedding table and the classifier (one tensor when tied) load as
    int4 and run as int4 (the loader used to widen the table to float32), in every scheme and group quantize
    offers, and the device logits, through prefill and decode, match the reference's. dim 48 is a multiple of
    no group: the table's rows are padded."""
    src = tmp_path / "src.gguf"
    write_test_gguf(src, random_weights(**SHAPE, shared=tied, seed=3))
    w = quantize_cli(src, tmp_path / "q.gguf", "--scheme", scheme, "--group", group, "--keep-8bit", "none")
    assert w.tied == tied
    asym = scheme == "asym"
    vocab, dim = SHAPE["vocab"], SHAPE["dim"]
    for t in (w.tok_embeddings, w.output):
        assert (t.kind, t.group, t.mins is not None) == ("int4", group, asym)
        assert t.nbytes == int4_nbytes(vocab, dim, group, asym)
    model = compare_logits(q, w, random_tokens(sum(FEEDS["prefill"])), FEEDS["prefill"], f"{scheme} g{group}")
    # on the device: the same bytes in whole row tiles (a 4-byte placeholder stands in for symmetric mins);
    # DeviceTensor.nbytes is what Llama.weight_bytes (bench's MB per token) counts for the classifier
    V = model.geometry.tile_rows
    on_device = int4_nbytes(round_up(vocab, V), dim, group, asym) + (0 if asym else 4)
    for dt in (model.tok_embeddings, model.output):
        assert dt.nbytes == int4_nbytes(vocab, dim, group, asym)
        assert sum(b.nbytes for b in dt.buffers) == on_device


def test_stories260K_int4_embedding_greedy(q, tmp_path):
    """stories260K (tied) through `quantize --keep-8bit none` (int4 g32 asym): greedy decoding on the device,
    whose choose_embed decodes the int4 table's row of each chosen token, follows the reference's logits."""
    stories_weights()
    d = llama2c_dir()
    w = quantize_cli(d / "stories260K.bin", tmp_path / "q.gguf", "-z", d / "tok512.bin", "--keep-8bit", "none")
    assert w.tied and w.tok_embeddings.kind == "int4"
    prompt = oracle_ids("reference_stories260K_greedy_ids.txt")[:5]
    ids = check_greedy(Llama(w, q), w, prompt, 60, "stories260K int4")
    assert len(set(ids)) > 15          # a story, not one token over and over


# ---------------------------------------------------------------- the sampler

def xorshift_reference(seed: int, n: int) -> list[int]:
    """run.c's random_u32, written again in numpy uint64 arithmetic (which wraps like C's)."""
    s = np.array([seed], np.uint64)
    out = []
    for _ in range(n):
        s ^= s >> np.uint64(12)
        s ^= s << np.uint64(25)
        s ^= s >> np.uint64(27)
        out.append(int((s * np.uint64(0x2545F4914F6CDD1D))[0] >> np.uint64(32)))
    return out


@pytest.mark.parametrize("seed", [42, 1, 2 ** 63 + 12345])
def test_xorshift_matches_run_c(seed):
    want = xorshift_reference(seed, 1000)
    rng = XorShift(seed)
    assert [rng.u32() for _ in range(1000)] == want
    rng = XorShift(seed)
    assert [rng.f32() for _ in range(1000)] == [(u >> 8) / 16777216.0 for u in want]    # random_f32


def sample_run(model, sampler: Sampler, steps: int = 64, prompt=(1,)) -> list[int]:
    return list(generate(model, list(prompt), steps, sampler))


def test_seed_reproduces_and_differs(stories):
    a = sample_run(stories, Sampler(temperature=1.0, top_p=0.9, seed=42))
    b = sample_run(stories, Sampler(temperature=1.0, top_p=0.9, seed=42))
    c = sample_run(stories, Sampler(temperature=1.0, top_p=0.9, seed=4242))
    assert a == b
    assert a != c


def test_top_k_1_is_greedy(stories):
    greedy = sample_run(stories, Sampler(temperature=0))
    assert sample_run(stories, Sampler(temperature=1.0, top_k=1, seed=9)) == greedy
    assert sample_run(stories, Sampler(temperature=0.7, top_k=1, top_p=0.0, seed=10)) == greedy


def repeated_ngrams(ids: list[int], n: int = 6) -> int:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


def test_repeat_penalty_changes_a_repetitive_greedy_run(stories):
    greedy = sample_run(stories, Sampler(temperature=0), steps=256)
    assert repeated_ngrams(greedy) > 20           # stories260K's greedy story loops (46 repeated 6-grams)
    penalized = sample_run(stories, Sampler(temperature=0, repeat_penalty=1.3), steps=256)
    assert penalized != greedy
    assert repeated_ngrams(penalized) < repeated_ngrams(greedy)


def test_repeat_penalty_window():
    """repeat_last_n bounds the penalized tokens (0 turns the penalty off, -1 covers all history), and each
    token is penalized once however often it occurs."""
    logits = np.array([2.0, -2.0, 4.0, 1.0], np.float32)
    history = [0, 0, 1, 2]
    got = Sampler(repeat_penalty=2.0, repeat_last_n=2).penalize(logits, history)
    np.testing.assert_array_equal(got, [2.0, -4.0, 2.0, 1.0])      # only tokens 1 and 2 are in the window
    np.testing.assert_array_equal(Sampler(repeat_penalty=2.0, repeat_last_n=-1).penalize(logits, history),
                                  [1.0, -4.0, 2.0, 1.0])
    np.testing.assert_array_equal(Sampler(repeat_penalty=2.0, repeat_last_n=0).penalize(logits, history), logits)


def test_llama2c_v2_groups_smaller_than_8(q, tmp_path):
    """A llama2.c v2 file whose Q8_0 group is not a multiple of 8 (upstream export.py's and write_llama2c's
    for widths like hidden 100 or stories260K's 172: group 4) runs, its matrices uploaded as float32."""
    path = tmp_path / "v2.bin"
    random_llama2c(path, **SHAPE, version=2, shared=False, seed=3)
    w = load_llama2c(path)
    assert w.layers[0].w2.kind == "q8" and w.layers[0].w2.group == 4
    for feeds in FEEDS.values():
        compare_logits(q, w, random_tokens(sum(feeds)), feeds, "q8 group 4")


@pytest.mark.parametrize("config", ["cpu", *CONFIGS])
def test_fp16_kv_cache_matches_reference(q, random_model, config):
    """The default fp16 KV cache against a reference that rounds its keys and values to fp16 alike, in sequence
    passes (prefill chunks, decode steps) and batched ones, on float32 weights: with no quantized input there is
    no rounding step for an fp16 value's neighbour to flip, and the logits stay within float32's tolerance."""
    cq = q if config == "cpu" else queue_with(q, CONFIGS[config])
    for feeds in FEEDS.values():
        model = compare_logits(cq, random_model, random_tokens(sum(feeds)), feeds, f"fp16 KV {config}", kv_cache="f16")
        assert model.cache.k.nbytes == model.cache.v.nbytes == 2 * model.config.n_layers * model.config.kv_dim * \
            model.cache.seq_p
    compare_batched(cq, random_model, f"fp16 KV {config}", kv_cache="f16")


def test_logits_that_are_not_finite_stop_generation(q, random_model):
    """NaN or infinite logits (weights or activations that overflowed) are an error naming the position, for
    greedy decoding on the device (choose_embed marks them) and for the host's sampler alike."""
    model = Llama(random_model, q)
    model.start([1, 5])
    model.feed(2)
    for bad in (np.nan, np.inf):
        model.logits.set(np.full(random_model.config.vocab_size, bad, np.float32))
        with pytest.raises(DpllamaError, match="^the logits at position 1 are not finite"):
            model.read_logits()
        with pytest.raises(DpllamaError, match="^the logits at position 2 are not finite"):
            model.next_chosen()
        model.start([1, 5])
        model.feed(2)


# ---------------------------------------------------------------- architectures: qwen2, qwen3, Llama 3's RoPE scaling,
#                                                                   Mistral

# head_dim 8 has 4 RoPE frequencies: theta 500000 gives wavelengths 6.3, 167, 4.4e3 and 1.2e5 positions, so with an
# original context of 256 (high_freq_factor 4: below 64 kept; low_freq_factor 1: above 256 slowed 8x) Llama 3.1's
# scaling keeps the first, blends the second and slows the last two: every branch of llama3_rope_factors.
LLAMA3 = dict(rope_theta=500000.0, rope_freq_factors=llama3_rope_factors(8, 500000.0, 8.0, 1.0, 4.0, 256))
ARCHITECTURES = {    # name -> ModelConfig fields of a random model
    "qwen2": dict(arch="qwen2", rope_neox=True, qkv_bias=True, rope_theta=1e6),
    "llama3": LLAMA3,
    "llama-qkv-bias": dict(qkv_bias=True),       # llama.cpp's llama takes Q/K/V biases where a file has them
    # heads of 12 where dim / n_heads is 8 (attention.key_length; q_dim 72, not dim 48), each head of q and k
    # RMS-normalized before RoPE: heads of 12 are no whole tiles, so store_qkv's lane-by-lane path serves them
    "qwen3": dict(arch="qwen3", rope_neox=True, qk_norm=True, rope_theta=1e6, key_length=12),
    "llama-key-length": dict(key_length=24),     # as Mistral Nemo's: q_dim 144 against dim 48
    # YaRN as dpllama's container writes it (rope_freqs.weight and attn_factor): cos and sin grow 1 + 0.1 ln 4
    "qwen2-yarn": dict(arch="qwen2", rope_neox=True, qkv_bias=True, rope_theta=1e6,
                       **dict(zip(("rope_freq_factors", "rope_mscale"), yarn_rope(8, 1e6, 4.0, 16)))),
    # LongRoPE as dpllama's container writes it (its Q, K, V, gate and up apart; llama.cpp's fused: phi3_tiny):
    # the model's context of 32 is over the original 16, so the long factors turn it
    "phi3": dict(arch="phi3", rope_neox=True, rope_freq_factors=(1.0, 1.25, 1.5, 2.0),
                 rope_long_factors=(1.0, 3.0, 9.0, 27.0), rope_long_from=16, rope_mscale=1.25),
}


def architecture_model(tmp_path, name: str, seed: int = 3) -> Weights:
    """A random model of architecture `name` (SHAPE, untied), written as a llama.cpp GGUF and loaded back."""
    path = tmp_path / f"{name}.gguf"
    write_test_gguf(path, random_weights(**SHAPE, shared=False, seed=seed, **ARCHITECTURES[name]))
    return load_gguf(path)


def test_architectures_load_as_written(tmp_path):
    for name, fields in ARCHITECTURES.items():
        w = architecture_model(tmp_path, name)
        for field, value in fields.items():
            assert getattr(w.config, field) == value, (name, field)
        assert (w.layers[1].bq is not None) == w.config.qkv_bias
        assert (w.layers[1].k_norm is not None) == w.config.qk_norm
    assert LLAMA3["rope_freq_factors"][0] == 1.0 and LLAMA3["rope_freq_factors"][2:] == (8.0, 8.0)
    assert 1.0 < LLAMA3["rope_freq_factors"][1] < 8.0


@pytest.mark.parametrize("feeds", FEEDS)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architectures_match_reference(q, tmp_path, name, feeds):
    """Biases, NEOX RoPE (by the rows' order on the device) and Llama 3's frequencies, prefill and decode, f32
    and int4, against the reference's direct computation of each."""
    w = architecture_model(tmp_path, name)
    for variant in ("f32", "int4-asym-g64"):
        compare_logits(q, VARIANTS[variant](w), random_tokens(sum(FEEDS[feeds])), FEEDS[feeds], f"{name} {variant}")


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architectures_match_reference_other_configs(config_q, tmp_path, name):
    """The same under the GPU-like geometry, prompts across chunks and decode's attention fused into the QKV
    launch (qkv_attention's store of q and k, with the biases, and its attention on them)."""
    config, cq = config_q
    feeds = [12, 1, 1, 3, 1, 1]
    w = architecture_model(tmp_path, name)
    # (heads' norms come between QKV and attention, so they keep the two launches apart)
    assert Llama(w, cq).fused_attention == (config.startswith("fused") and not w.config.qk_norm)
    compare_logits(cq, w, random_tokens(sum(feeds), 5), feeds, f"{name} {config}")
    compare_batched(cq, w, f"{name} {config} batched")


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama3", "qwen2-yarn", "phi3"])
def test_architectures_through_quantize(q, tmp_path, name):
    """`dpllama quantize` keeps the architecture, the biases, the heads' norms and width and the RoPE scaling (the
    file says them as llama.cpp's do: general.architecture, blk.N.attn_q.bias, blk.N.attn_q_norm.weight,
    attention.key_length, rope_freqs.weight), and the model it writes runs."""
    src = tmp_path / "src.gguf"
    f32 = random_weights(**SHAPE, shared=False, seed=3, **ARCHITECTURES[name])
    write_test_gguf(src, f32)
    w = quantize_cli(src, tmp_path / "q.gguf", "--scheme", "asym")
    for field, value in ARCHITECTURES[name].items():
        assert getattr(w.config, field) == value, field
    for a, b in zip(w.layers, f32.layers):
        for field in ("bq", "bk", "bv", "q_norm", "k_norm"):
            assert (getattr(a, field) is None and getattr(b, field) is None) or np.array_equal(getattr(a, field),
                                                                                               getattr(b, field))
    compare_logits(q, w, random_tokens(sum(FEEDS["prefill"])), FEEDS["prefill"], f"{name} quantized")


def test_llama3_scaling_from_metadata(q, tmp_path):
    """Llama 3.1's scaling given by its parameters (rope.scaling.type "llama3" and the four keys) instead of
    rope_freqs.weight: the same factors, so the same logits."""
    w = random_weights(**SHAPE, shared=False, seed=3, **LLAMA3)
    scaling = {"llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0,
               "llama.rope.scaling.low_freq_factor": 1.0, "llama.rope.scaling.high_freq_factor": 4.0,
               "llama.rope.scaling.original_context_length": 256}
    path = tmp_path / "m.gguf"
    write_test_gguf(path, w, drop={"rope_freqs.weight"}, fields=scaling)
    loaded = load_gguf(path)
    assert loaded.config.rope_freq_factors == LLAMA3["rope_freq_factors"]
    compare_logits(q, loaded, random_tokens(sum(FEEDS["prefill"])), FEEDS["prefill"], "llama3 from metadata")


@pytest.mark.parametrize("fields, drop, message", [
    ({"llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0, "llama.rope.scaling.low_freq_factor": 1.0,
      "llama.rope.scaling.high_freq_factor": 4.0, "llama.rope.scaling.original_context_length": 256}, (),
     "RoPE scaling given twice, by rope_freqs.weight and by llama.rope.scaling.type: expected one"),
    ({"llama.rope.scaling.type": "llama3", "llama.rope.scaling.factor": 8.0, "llama.rope.scaling.low_freq_factor": 4.0,
      "llama.rope.scaling.high_freq_factor": 4.0, "llama.rope.scaling.original_context_length": 256},
     {"rope_freqs.weight"},
     r"llama.rope.scaling.\{factor,low_freq_factor,high_freq_factor,original_context_length\} are \[8.0, 4.0, 4.0, "
     r"256\]: expected factor > 0, 0 < low_freq_factor < high_freq_factor, original_context_length > 0"),
    ({"llama.rope.scaling.type": "llama3"}, {"rope_freqs.weight"}, "missing GGUF metadata llama.rope.scaling.factor"),
    ({"llama.rope.scaling.type": "longrope"}, {"rope_freqs.weight"},
     "llama.rope.scaling.type is 'longrope', whose factors are the tensors rope_factors_long.weight and "
     "rope_factors_short.weight: missing"),
    ({"llama.rope.scaling.type": "su"}, {"rope_freqs.weight"},
     "llama.rope.scaling.type is 'su', expected 'none', 'linear', 'yarn', 'llama3' or 'longrope' \\(other RoPE "
     "scalings are not supported\\)"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": -4.0}, {"rope_freqs.weight"},
     r"llama.rope.scaling.factor must be a positive float32 \(1.175e-38 to 3.403e\+38\), found -4.0"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
      "llama.rope.scaling.original_context_length": 0}, {"rope_freqs.weight"},
     "llama.rope.scaling.original_context_length must be positive, found 0"),
    ({"llama.rope.scaling.attn_factor": 0.0}, (),
     r"llama.rope.scaling.attn_factor must be a positive float32 \(1.175e-38 to 3.403e\+38\), found 0.0"),
    ({"llama.rope.scaling.factor": 2.0}, (),     # linear (llama.cpp's default type) as well as rope_freqs.weight
     "RoPE scaling given twice, by rope_freqs.weight and by llama.rope.scaling.type: expected one"),
    ({"llama.expert_count": 8}, (), "llama.expert_count is 8: mixture-of-experts models are not supported"),
    ({"llama.attention.value_length": 12}, (),
     r"llama.attention.value_length is 12, expected head_dim 8 \(other values are not supported\)"),
    ({"llama.attention.key_length": 12, "llama.rope.dimension_count": 12}, {"rope_freqs.weight"},   # Wq: 6 x 12 rows
     r"tensor blk.0.attn_q.weight has shape \[48, 48\], expected \[72, 48\]"),
    ({"llama.rope.dimension_count": 4}, (),      # RoPE over part of a head (Phi-2's partial rotary)
     r"llama.rope.dimension_count is 4, expected head_dim 8 \(other values are not supported\)"),
])
def test_architecture_variants_refused(tmp_path, fields, drop, message):
    path = tmp_path / "m.gguf"
    write_test_gguf(path, random_weights(**SHAPE, **LLAMA3), drop=drop, fields=fields)
    with pytest.raises(DpllamaError, match=f"^{path}: {message}$"):
        load_gguf(path)


def test_rope_freqs_must_be_positive(tmp_path):
    path = tmp_path / "m.gguf"
    write_test_gguf(path, random_weights(**SHAPE, rope_freq_factors=(1.0, 0.0, 8.0, 8.0)))
    with pytest.raises(DpllamaError, match=f"^{path}: impossible model: rope_freqs.weight must be positive float32s "
                                           rf"\(1.175e-38 to 3.403e\+38\), found 0.0$"):
        load_gguf(path)


# llama.cpp's logits for tiny models (tests/helpers.py's LLAMA_CPP_MODELS: a Qwen3, one with YaRN, a llama with
# linear RoPE scaling, a Phi-3 with fused matrices and LongRoPE; tests/oracles/make_llamacpp.py), an oracle
# independent of dpllama's reading of each. Its CPU attention rounds q and the softmax's weights to fp16 to multiply
# them by its fp16 KV cache, where dpllama's keeps them float32: a relative 2^-11 on each score and weight, through
# two layers. Measured: 3.1e-4 to 4.1e-4 of a row's largest logit (the reference), against 0.20 for the Qwen3
# without its heads' norms, 0.49 with adjacent RoPE pairs, 0.52 and 0.49 without YaRN and linear scaling, 0.24
# without YaRN's magnitude; for the Phi-3 0.32 without attn_factor, 0.67 with LongRoPE's short divisors, 0.85 with
# adjacent pairs, 0.87 with gate and up swapped; 3e-3 is ten times the measured and far below any of those.
LLAMA_CPP_RTOL = 3e-3


@pytest.fixture(scope="module")
def llama_cpp_oracles(tmp_path_factory) -> dict:
    """Each of LLAMA_CPP_MODELS written and loaded as any GGUF, with the tokens and logits llama.cpp gave for it."""
    out = {}
    for name in LLAMA_CPP_MODELS:
        oracle = np.load(ORACLES / f"{name}_llamacpp.npz")
        path = tmp_path_factory.mktemp("llama_cpp") / f"{name}.gguf"
        tiny_qwen3(path, name=name)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == str(oracle["gguf_sha256"]), \
            f"{name} differs from the model llama.cpp's logits are of: rerun tests/oracles/make_llamacpp.py"
        out[name] = load_gguf(path), oracle["tokens"].tolist(), oracle["logits"]
    return out


@pytest.fixture(scope="module")
def qwen3_tiny(llama_cpp_oracles):
    return llama_cpp_oracles["qwen3_tiny"]


def assert_llama_cpp(got: np.ndarray, want: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=LLAMA_CPP_RTOL * np.abs(want).max(), err_msg=what)


@pytest.mark.parametrize("model", LLAMA_CPP_MODELS)
def test_reference_matches_llama_cpp(llama_cpp_oracles, model):
    w, tokens, want = llama_cpp_oracles[model]
    ref = Reference(w)
    for p, t in enumerate(tokens):
        assert_llama_cpp(ref.forward(t, p), want[p], f"{model}: position {p}")


@pytest.mark.parametrize("model", LLAMA_CPP_MODELS)
@pytest.mark.parametrize("config", ["shipped", *CONFIGS])
def test_matches_llama_cpp(q, llama_cpp_oracles, config, model):
    """A 24-token prompt, then decode, with the fp16 KV cache, under each config (for Qwen3 the layer launch's phase
    of the heads' norms, and their own kernel after the QKV launch elsewhere)."""
    w, tokens, want = llama_cpp_oracles[model]
    m = Llama(w, q if config == "shipped" else queue_with(q, CONFIGS[config]))
    m.start(tokens)
    m.feed(24)
    assert_llama_cpp(m.read_logits(), want[23], f"{model} {config}: the prompt's last position")
    for p in range(24, len(tokens)):
        m.next_given()
        m.feed(1)
        assert_llama_cpp(m.read_logits(), want[p], f"{model} {config}: position {p}")


@pytest.mark.parametrize("arch, tensor", [("qwen3", "blk.1.attn_k_norm.weight"), ("qwen2", "blk.1.attn_v.bias")])
def test_architectures_need_their_tensors(tmp_path, arch, tensor):
    """Qwen3 without a head's norm, Qwen2 without a bias: one line naming the tensor, not a llama computed."""
    path = tmp_path / "q.gguf"
    write_test_gguf(path, random_weights(**SHAPE, **ARCHITECTURES[arch]), drop={tensor})
    with pytest.raises(DpllamaError, match=f"^{path}: missing tensor {tensor}$"):
        load_gguf(path)


def test_longrope_chooses_by_the_context(q, llama_cpp_oracles):
    """Phi-3's LongRoPE as llama.cpp chooses: the short factors for a context of at most the original's tokens, the
    long past it (what llama.cpp's logits for phi3_tiny's context of 64 were made with). In a context of 16 the
    device's logits are the reference's with the short factors, and far from the long ones'."""
    w, tokens, long_logits = llama_cpp_oracles["phi3_tiny"]
    c = w.config
    assert (c.rope_factors(16), c.rope_factors(17), c.rope_factors(64)) == \
        (c.rope_freq_factors, c.rope_long_factors, c.rope_long_factors)
    m = Llama(w, q, max_seq=16)
    short = Reference(Weights(dataclasses.replace(c, seq_len=16), w.tok_embeddings, w.layers, w.norm, w.output))
    m.start(tokens[:16])
    m.feed(16)
    want = [short.forward(t, p) for p, t in enumerate(tokens[:16])][-1]
    assert_llama_cpp(m.read_logits(), want, "phi3_tiny in a context of 16")
    assert np.abs(want - long_logits[15]).max() > 0.1 * np.abs(long_logits[15]).max()


@pytest.mark.parametrize("change, message", [
    (dict(extra={"blk.1.attn_qkv.weight": np.ones((60, 64), np.float32)}),
     "tensor blk.1.attn_qkv.weight has shape \\[60, 64\\], expected \\[128, 64\\]"),
    (dict(drop={"blk.0.ffn_up.weight"}), "missing tensor blk.0.ffn_up.weight"),
    (dict(drop={"rope_factors_short.weight"}), "missing tensor rope_factors_short.weight"),
    (dict(extra={"rope_freqs.weight": np.ones(8, np.float32)}), "RoPE scaling given twice, by "
     "rope_factors_long.weight and by rope_freqs.weight or phi3.rope.scaling.type: expected one"),
    (dict(fields={"phi3.rope.scaling.original_context_length": "16"}),
     "metadata phi3.rope.scaling.original_context_length holds str, expected int"),
    (dict(fields={"phi3.rope.scaling.original_context_length": -16}),
     "phi3.rope.scaling.original_context_length must be positive, found -16"),
    (dict(extra={"rope_factors_long.weight": np.full(8, -1.0, np.float32)}),
     "impossible model: rope_factors_long.weight must be positive float32s \\(1.175e-38 to 3.403e\\+38\\), "
     "found -1.0"),
])
def test_bad_phi3_files(tmp_path, change, message):
    """A Phi-3 file (phi3_tiny's, its Q, K and V fused, gate and up fused, LongRoPE) with a fused matrix of the
    wrong shape or missing, half of LongRoPE missing, or scaled twice: one line naming the tensor."""
    path = tmp_path / "phi3.gguf"
    tiny_qwen3(path, name="phi3_tiny", **change)
    with pytest.raises(DpllamaError, match=f"^{path}: {message}$"):
        load_gguf(path)


def test_mistral_style_llama(q, tmp_path):
    """A Mistral 7B file as llama.cpp converts it: architecture llama, GQA 4:1, RoPE base 1e6, a 32k context and a
    SentencePiece vocabulary, and no sliding window (llama.cpp's llama writes none and attends to the whole
    context; Mistral 7B v0.2 and later have none). It loads, tokenizes and runs like any llama."""
    from dpllama import load as load_llm
    from tests.test_tokenizer import base_pieces, spm_fields

    pieces = base_pieces() + [b" the", b"he", b" t"]
    tokenizer = spm_fields(pieces, [0.0] * 259 + [-1.0, -2.0, -3.0], **{"tokenizer.ggml.add_bos_token": True})
    shape = dict(SHAPE, n_heads=8, n_kv_heads=2, dim=64, vocab=len(pieces), seq_len=32768)
    path = tmp_path / "mistral.gguf"
    write_test_gguf(path, random_weights(**shape, shared=False, seed=4, rope_theta=1e6), tokenizer=tokenizer)
    llm = load_llm(str(path), max_seq=64)
    assert (llm.tokenizer.kind, llm.model.config.n_kv_heads, llm.model.config.rope_theta) == ("spm", 2, 1e6)
    assert llm.tokenizer.encode("the") == [1, len(pieces) - 3]
    w = load_gguf(path)
    w.config.seq_len = 64       # the reference's cache is as long as the context
    compare_logits(q, w, random_tokens(sum(FEEDS["prefill"])), FEEDS["prefill"], "mistral-style")
