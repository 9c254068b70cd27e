"""Bad input from the Python API and edge cases of the sampler: a DpllamaError naming the problem, at once,
never a traceback from deep inside or a silently wrong result. Killed writers' temporaries do not pile up."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import dpllama
from dpllama.commands.perplexity import read_text
from dpllama.errors import DpllamaError
from dpllama.fileio import HOST, remove_stale
from dpllama.generate import Sampler
from dpllama.hub import local_model
from dpllama.loaders import load_weights
from dpllama.runtime.config import load_config
from dpllama.tokenizer import Llama2cTokenizer, load_gguf_tokenizer
from tests.helpers import llama2c_dir


TEMPERATURE = "temperature must be >= 0 and at most 3.403e+38 (float32's largest)"
PENALTY = "repeat-penalty must be > 0 and at most 3.403e+38 (float32's largest)"


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=math.nan), f"{TEMPERATURE}, found nan"),
    (dict(temperature=math.inf), f"{TEMPERATURE}, found inf"),
    (dict(temperature=1e39), f"{TEMPERATURE}, found 1e+39"),     # finite in float64, infinite on the device
    (dict(temperature=-1), f"{TEMPERATURE}, found -1"),
    (dict(top_p=math.nan), "top-p must be between 0 and 1, found nan"),
    (dict(top_p=2), "top-p must be between 0 and 1, found 2"),
    (dict(top_k=-1), "top-k must be >= 0, found -1"),
    (dict(temperature=0.8, repeat_penalty=math.nan), f"{PENALTY}, found nan"),
    (dict(repeat_penalty=1e39), f"{PENALTY}, found 1e+39"),
    (dict(repeat_penalty=0), f"{PENALTY}, found 0"),
    (dict(repeat_last_n=-2), "repeat-last-n must be >= -1, found -2"),
    (dict(temperature="0"), "temperature must be a number, found '0'"),     # TypeErrors from deep inside, before
    (dict(top_k=2.5), "top-k must be a whole number, found 2.5"),
    (dict(seed=None), "seed must be a whole number, found None"),
    (dict(repeat_last_n=2.5), "repeat-last-n must be a whole number, found 2.5"),
])
def test_sampler_rejects_bad_values(kwargs, message):
    with pytest.raises(DpllamaError, match=f"^sampling: {re.escape(message)}$"):
        Sampler(**kwargs)


def test_top_p_below_one_over_vocab_keeps_the_most_likely_token():
    """Flat probabilities and top-p < 1 / vocab: no token reaches run.c's cutoff, the nucleus is the top one."""
    assert Sampler(top_p=0.001, seed=1).sample(np.full(512, 1 / 512, np.float32)) == 0


def test_top_p_below_float32s_least_stays_a_cut_on_the_device():
    """top-p 1e-50 (--top-p, the API) is 0 in float32, the device's "off"; it is taken as float32's least normal
    number, which keeps the most likely token alone, as 1e-50 does."""
    assert np.float32(Sampler(top_p=1e-50).draw()[1]) == np.finfo(np.float32).tiny


def test_api_generate_rejects_bad_arguments_at_the_call():
    d = llama2c_dir()
    llm = dpllama.load(str(d / "stories260K.bin"), str(d / "tok512.bin"), max_seq=16)
    for kwargs, message in [(dict(temperature=-1), "temperature must be >= 0"),
                            (dict(top_p=2), "top-p must be between 0 and 1"),
                            (dict(steps=-5), "steps must be >= 0, found -5"),
                            (dict(steps="10"), "steps must be a whole number, found '10'"),
                            # the prompt is 5 positions with BOS: 4 would end inside it, generating nothing
                            (dict(steps=4), "steps 4 ends inside the prompt of 5 tokens, so nothing would be "
                                            "generated")]:
        with pytest.raises(DpllamaError, match=message):
            llm.generate("Once upon a time", **kwargs)          # raised by the call, before any iteration
    assert "".join(llm.generate("Once upon a time", steps=8, temperature=0)).startswith("Once upon a time")
    assert "".join(llm.generate("Once upon a time", steps=5, temperature=0)) == "Once upon a time,"    # run.c's one


@pytest.fixture(scope="module")
def stories_llm():
    d = llama2c_dir()
    return dpllama.load(str(d / "stories260K.bin"), str(d / "tok512.bin"))


def greedy(llm, prompt: str) -> str:
    return "".join(llm.generate(prompt, steps=40, temperature=0))


def test_a_generation_started_over_another_ends_the_first(stories_llm):
    """A sequence runs one generation at a time: a stream read after another generation started on its sequence (two
    streams in turns, one created and read after another call, one resumed after another call) is a DpllamaError,
    where their tokens mixed in one KV cache and both gave wrong text; the later one gives what it gives alone."""
    llm = stories_llm
    alone = {p: greedy(llm, p) for p in ("Once upon a time", "The dog")}
    first = iter(llm.generate("Once upon a time", steps=40, temperature=0))
    head = [next(first) for _ in range(4)]
    assert "".join(llm.generate("The dog", steps=40, temperature=0)) == alone["The dog"]
    with pytest.raises(DpllamaError, match=r"^another generation was started on this sequence \(slot 0\) since this "
                                           r"one was: a sequence runs one at a time"):
        next(first)
    assert alone["Once upon a time"].startswith("".join(head))
    created = llm.generate("Once upon a time", steps=40, temperature=0)
    assert greedy(llm, "The dog") == alone["The dog"]
    with pytest.raises(DpllamaError, match="another generation was started"):
        "".join(created)
    assert greedy(llm, "Once upon a time") == alone["Once upon a time"]


def test_one_model_from_two_threads_gives_right_text_or_an_error(stories_llm):
    """Two threads each generating on one model: each gets its text as alone, or a DpllamaError where the other
    started over it; never text mixed from both (it came 9 and 10 times in 10)."""
    import threading
    llm = stories_llm
    prompts = ("Once upon a time", "The dog")
    alone = {p: greedy(llm, p) for p in prompts}
    for _ in range(5):
        got = {}

        def run(prompt):
            try:
                got[prompt] = greedy(llm, prompt)
            except DpllamaError as e:
                got[prompt] = e
        threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for p in prompts:
            assert got[p] == alone[p] or "another generation was started" in str(got[p]), (p, got[p])


def test_chat_after_other_use_of_its_model(stories_llm):
    """A chat whose model ran another generation between its turns (llm.generate, another Chat) re-reads its
    conversation instead of trusting the KV cache it left, which the other one overwrote: its turn is the one an
    uninterrupted chat gives. A reply asked for while the last is still being read is refused, the conversation
    unchanged."""
    from dpllama.chat import Chat
    from dpllama.generate import Sampler
    llm = stories_llm

    def chat():
        return Chat(llm, Sampler(temperature=0), max_reply=40)
    c = chat()
    "".join(c.reply("Hello"))
    want = "".join(c.reply("Tell me a story"))
    c, other = chat(), chat()
    "".join(c.reply("Hello"))
    greedy(llm, "The dog")
    assert "".join(c.reply("Tell me a story")) == want
    c = chat()
    "".join(c.reply("Hello"))
    "".join(other.reply("Goodbye"))
    assert "".join(c.reply("Tell me a story")) == want
    c = chat()
    pieces = c.reply("Hello")
    next(pieces)
    with pytest.raises(DpllamaError, match="^the last reply is still being read: read it to its end or close it"):
        next(c.reply("Tell me a story"))
    "".join(pieces)
    assert [m["role"] for m in c.messages] == ["user", "assistant"]
    assert "".join(c.reply("Tell me a story")) == want


@pytest.mark.parametrize("kwargs", [dict(slots=0), dict(slots=-1), dict(slots=2.5), dict(slots=None),
                                    dict(max_seq=1.5), dict(max_seq=True), dict(chunk=-3), dict(chunk="8")])
def test_api_load_rejects_counts_that_are_not_whole_and_positive(kwargs):
    """Before anything loads (slots=0 failed in the driver, -1 in NumPy, 2.5 in Python; chunk=-3 became 1)."""
    (name, value), = kwargs.items()
    with pytest.raises(DpllamaError, match=f"^{name} must be a whole number of at least 1, found "
                                           f"{re.escape(repr(value))}$"):
        dpllama.load("/nonexistent/model.gguf", **kwargs)


def test_api_stream_rejects_negative_steps(stories_llm):
    with pytest.raises(DpllamaError, match="^steps must be >= 0, found -5$"):     # it gave '' where generate refused
        stories_llm.stream([1, 2], -5, Sampler(temperature=0))


def test_api_calls_with_arguments_of_the_wrong_kind(stories_llm):
    """One line at the call for what raised TypeError, ValueError or AttributeError from deep inside; a NumPy array
    of ids is a prompt; the stream is an iterator, as generate's annotation says."""
    from dpllama.chat import Chat
    llm, greedy = stories_llm, Sampler(temperature=0)
    for call, message in [(lambda: llm.generate(None), "the prompt must be a str, found NoneType"),
                          (lambda: llm.generate(b"Once"), "the prompt must be a str, found bytes"),
                          (lambda: llm.stream("Once", 8, greedy), "the prompt must be a list of token ids"),
                          (lambda: llm.stream([1, 2.5], 8, greedy), "the prompt must be a list of token ids"),
                          (lambda: llm.stream([1, 2], 8, None), "sampler must be a dpllama.generate.Sampler"),
                          (lambda: Chat(llm, greedy, max_reply=-1), "max_reply must be >= 0, found -1"),
                          (lambda: Chat(llm, greedy, max_reply=2.5), "max_reply must be a whole number, found 2.5"),
                          (lambda: Chat(llm, None), "sampler must be a dpllama.generate.Sampler")]:
        with pytest.raises(DpllamaError, match=f"^{re.escape(message)}"):
            call()
    ids = llm.encode("Once upon a time")
    assert "".join(llm.stream(np.array(ids), 20, greedy)) == "".join(llm.stream(ids, 20, greedy))
    assert next(llm.generate("Once upon a time", steps=8, temperature=0)) == "Once"


def test_api_load_rejects_bad_activation_bits_before_reading_the_model():
    """Checked first: the model named here does not exist, and the error is about the bits, not the file."""
    with pytest.raises(DpllamaError, match="activation bits must be one of 16, 8, found 4"):
        dpllama.load("/nonexistent/model.gguf", activation_bits=4)


def test_inputs_that_are_not_regular_files_are_refused_unread(tmp_path):
    """Each input read whole or mapped: a device would be read without end (/dev/zero), a FIFO blocks until a writer
    comes; and /proc/self/mem, a regular file, refuses reads."""
    os.mkfifo(tmp_path / "fifo")
    for path in ("/dev/zero", tmp_path / "fifo"):
        for read in (Llama2cTokenizer, load_gguf_tokenizer, load_weights, load_config, read_text,
                     lambda p: local_model(str(p))):
            with pytest.raises(DpllamaError, match=f"^{path}: not a regular file$"):
                read(path)
    with pytest.raises(DpllamaError, match="^/proc/self/mem: cannot read: Input/output error$"):
        load_weights("/proc/self/mem")


def test_more_sequences_than_the_device_holds_any_context_for():
    """`serve --parallel 999999`: the passes' scratch alone is more than one allocation; one line, before anything is
    allocated (the context used to shrink to a step, then the driver failed)."""
    d = llama2c_dir()
    with pytest.raises(DpllamaError, match=r"^the model's context of 512 tokens for 999999 sequence\(s\) needs \d+ MiB "
                                           r".*, and so would the shortest context$"):
        dpllama.load(str(d / "stories260K.bin"), str(d / "tok512.bin"), slots=999999)


def test_remove_stale_takes_only_dead_writers_temporaries(tmp_path):
    """A killed writer's temporary goes (file or folder); a live one's stays, whoever it is, and so does another
    host's until it is a day old (its PID says nothing here); files that are not dpllama's temporaries stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    names = {f".m.gguf.{dead}@{HOST}.abcd1234.tmp": False, f".pull.{dead}@{HOST}.abcd1234": False,
             f".m.gguf.{os.getpid()}@{HOST}.abcd1234.tmp": True, f".m.gguf.1@{HOST}.abcd1234.tmp": True,
             f".m.gguf.{dead}@elsewhere.abcd1234.tmp": True, f".old.{dead}@elsewhere.abcd1234.tmp": False,
             ".m.gguf.tmp": True, f"m.gguf.{dead}@{HOST}.abcd1234.tmp": True}
    for name in names:
        (tmp_path / name).mkdir() if name.startswith(".pull") else (tmp_path / name).write_text("")
    (tmp_path / f".pull.{dead}@{HOST}.abcd1234" / "half.whl").write_text("")
    os.utime(tmp_path / f".old.{dead}@elsewhere.abcd1234.tmp", (time.time() - 2 * 86400,) * 2)
    remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, kept in names.items() if kept)


def test_chat_reply_cut_short_joins_the_conversation_and_the_cache_stays_right():
    """A reply stopped halfway (Ctrl-C, or its stream closed) stays in the conversation as far as it went, the
    roles still alternating; the next reply is the one a fresh chat with that history gives, so the reused
    KV cache holds nothing from the cut."""
    from dpllama.chat import Chat
    d = llama2c_dir()
    llm = dpllama.load(str(d / "stories260K.bin"), str(d / "tok512.bin"))
    chat = Chat(llm, Sampler(temperature=0), max_reply=40)
    stream = chat.reply("Tell me a story")
    partial = "".join(next(stream) for _ in range(8))
    stream.close()
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert chat.messages[1]["content"] == partial.strip() != ""
    history = list(chat.messages)
    again = "".join(chat.reply("And then?"))
    fresh = Chat(llm, Sampler(temperature=0), max_reply=40)
    fresh.messages = history
    assert again == "".join(fresh.reply("And then?"))
