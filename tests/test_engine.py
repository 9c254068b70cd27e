"""The server's engine without a server: stop strings (StopText), a failed load."""
from __future__ import annotations

import random

from dpllama.serve.engine import Engine, StopText
from dpllama.serve.metrics import Metrics
from dpllama.tokenizer import Llama2cTokenizer
from tests.helpers import llama2c_dir


def stop_text(stops: tuple[str, ...]) -> StopText:
    return StopText(Llama2cTokenizer(llama2c_dir() / "tok512.bin"), 1, stops)


def by_search(pieces: list[str], stops: tuple[str, ...]) -> tuple[list[str], bool]:
    """What StopText sends for these pieces of text, by searching the text held for every stop and every stop's
    every prefix at each piece (the quadratic way it did it before): the pieces sent, and whether a stop cut them."""
    stops, sent, held = tuple(s for s in stops if s), [], ""
    for text in pieces:
        held += text
        cuts = [i for i in (held.find(s) for s in stops) if i >= 0]
        if cuts:
            return sent + [held[:min(cuts)]], True
        keep = max((n for s in stops for n in range(min(len(s) - 1, len(held)), 0, -1) if held.endswith(s[:n])),
                   default=0)
        sent.append(held[:len(held) - keep])
        held = held[len(held) - keep:]
    return sent + [held], False


def test_stop_strings_cut_where_the_first_completed_begins():
    """Random pieces over a two-letter alphabet, so that stops match often and in part: StopText sends what the
    search sends, piece by piece, with up to 4 stops of up to 6 characters, an empty one among them."""
    rng = random.Random(7)
    for case in range(3000):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randrange(7))) for _ in range(rng.randrange(1, 5)))
        pieces = ["".join(rng.choice("ab") for _ in range(rng.randrange(4))) for _ in range(rng.randrange(1, 12))]
        st = stop_text(stops)
        sent = [st.release(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
        want, cut = by_search(pieces, stops)
        if cut:
            assert st.stopped and sent[:len(want)] == want, (stops, pieces)
        else:
            assert not st.stopped and sent[:-1] == want[:-2] and sent[-1] == want[-2] + want[-1], (stops, pieces)


def test_overlapping_stops_and_a_stop_across_pieces():
    st = stop_text(("abcd", "bc"))
    assert st.release("xab") == "x" and st.release("c") == "a" and st.stopped      # "bc" completes first
    st = stop_text(("abcd", "bc"))
    assert st.release("xab") == "x" and st.release("cd") == "" and st.stopped     # both: "abcd" begins first
    st = stop_text(("aab",))
    assert [st.release(c) for c in "aaaa"] == ["", "", "a", "a"] and st.release("b") == "" and st.stopped
    st = stop_text(("the end",))
    assert st.release("and the") == "and " and st.release("n they ran", final=True) == "then they ran"


def test_a_load_that_raises_anything_is_fatal():
    """Whatever the load raises (the driver's RuntimeError for a buffer it cannot make, with --parallel 999999) ends
    the server through on_fatal, in one line; the scheduler thread used to die with a traceback and leave the server
    listening, never ready."""
    def load(slots):
        raise RuntimeError("create_buffer failed: OUT_OF_HOST_MEMORY")
    told = []
    engine = Engine(load, 2, 4, Metrics(), told.append)
    engine.start()
    engine._thread.join(10)
    assert told == ["loading the model failed: RuntimeError: create_buffer failed: OUT_OF_HOST_MEMORY"]
    assert not engine.ready.is_set() and not engine._thread.is_alive()
