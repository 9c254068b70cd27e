"""The `dpllama` command as a user runs it: generate, tokenize, chat, pull; output and exit codes."""
from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import NO_THINKING, QWEN3_CHAT_TEMPLATE, llama2c_dir, random_llama2c, smollm2_gguf_path, tiny_qwen3


def run(*args, cwd=None, stdin=None):
    return subprocess.run([sys.executable, "-m", "dpllama.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, input=stdin)


@pytest.fixture(scope="module")
def stories():
    d = llama2c_dir()
    return d, d / "stories260K.bin", d / "tok512.bin"


@pytest.mark.parametrize("prompt_args, steps, reference", [
    (("-p", "Once upon a time"), 128, "reference_stories260K_greedy.txt"),
    ((), 256, "reference_stories260K_greedy_noprompt_n256.txt"),
])
def test_generate_matches_llama2c_byte_for_byte(stories, repo_root, prompt_args, steps, reference):
    d, model, tok = stories
    r = run("generate", "-m", model, "-z", tok, *prompt_args, "-n", steps, "-t", 0, cwd=repo_root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.encode() == (d / reference).read_bytes()
    assert "achieved tok/s" in r.stderr


def test_cache_type_f32_matches_llama2c_too(stories, repo_root):
    """--cache-type f32 keeps the KV cache in float32, as run.c does: the same greedy text (the default fp16 cache's
    is test_generate_matches_llama2c_byte_for_byte's). A type that is not one is argparse's one-line error."""
    d, model, tok = stories
    r = run("generate", "-m", model, "-z", tok, "-p", "Once upon a time", "-n", 128, "-t", 0, "--cache-type", "f32",
            cwd=repo_root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.encode() == (d / "reference_stories260K_greedy.txt").read_bytes()
    r = run("generate", "-m", model, "-z", tok, "--cache-type", "q8_0", cwd=repo_root)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "argument --cache-type: must be f16 or f32, found 'q8_0'"), r.stderr


def test_generate_refuses_steps_that_end_inside_the_prompt(stories, repo_root):
    """run.c prints the start of such a prompt and stops, which reads as a broken model: one line instead."""
    _, model, tok = stories
    r = run("generate", "-m", model, "-z", tok, "-p", "Once upon a time", "-n", 4, "-t", 0, cwd=repo_root)
    assert r.returncode == 1 and r.stderr == (
        "dpllama: error: -n 4 ends inside the prompt of 5 tokens, so nothing would be generated: -n counts the "
        "prompt's positions too, as llama2.c's -n does; give at least 5\n"), r.stderr


def test_generate_clamps_steps_to_the_context(stories, repo_root):
    _, model, tok = stories
    r = run("generate", "-m", model, "-z", tok, "-n", 100000, "-t", 0, cwd=repo_root)
    assert r.returncode == 0
    assert "beyond the context of 512 tokens; running 512" in r.stderr


def test_seed_makes_sampling_reproducible(stories, repo_root):
    _, model, tok = stories
    a, b, c = (run("generate", "-m", model, "-z", tok, "-n", 60, "-t", 1.0, "-s", s, cwd=repo_root).stdout
               for s in (42, 42, 43))
    assert a == b and a != c


def test_generate_json_mode(repo_root):
    """--json: the continuation is one JSON object, and the generation ends as it closes (before -n does), where the
    same greedy run without it goes on past the object."""
    prompt = "A JSON object:"
    r = run("generate", "-m", smollm2_gguf_path(), "-p", prompt, "-n", 80, "-t", 0, "--json", cwd=repo_root)
    assert r.returncode == 0 and r.stdout.startswith(prompt), r.stderr
    assert isinstance(json.loads(r.stdout[len(prompt):]), dict), r.stdout     # nothing after it but the newline
    r = run("generate", "-m", smollm2_gguf_path(), "-p", prompt, "-n", 80, "-t", 0, cwd=repo_root)
    with pytest.raises(ValueError):
        json.loads(r.stdout[len(prompt):])


def test_generate_json_schema(repo_root, tmp_path):
    """--json-schema, as its text or a file holding it (llama.cpp's -j): the continuation is one object the schema
    admits, its properties in the schema's order. A schema the text cannot be held to, a file that cannot be read
    and text that is no JSON are each one line naming the problem and exit status 1, before the model loads."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "city": {"type": "string"}}, "required": ["name", "age"]}
    path = tmp_path / "person.json"
    path.write_text(json.dumps(schema))
    prompt = "A JSON object describing a person named Alice:"
    outs = []
    for arg in (json.dumps(schema), path):
        r = run("generate", "-m", smollm2_gguf_path(), "-p", prompt, "-n", 80, "-t", 0, "--json-schema", arg,
                cwd=repo_root)
        assert r.returncode == 0 and r.stdout.startswith(prompt), r.stderr
        value = json.loads(r.stdout[len(prompt):])
        assert list(value)[:2] == ["name", "age"] and type(value["age"]) is int, r.stdout
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    (tmp_path / "list.json").write_text("[]")
    for arg, message in [
            ('{"properties": {"a": {"type": "string", "format": "email"}}}',
             '--json-schema: #/properties/a: "format" "email" is not supported (supported: date, time, '
             'date-time, uuid)'),
            ('{"type": "array"}', "--json-schema: the schema's root must be an object"),
            ('{"type": ', "--json-schema: the JSON schema is no JSON: Expecting value: line 1 column 10"),
            (tmp_path / "missing.json", f"--json-schema: cannot read {tmp_path / 'missing.json'}: No such file"),
            (tmp_path / "list.json", f"{tmp_path / 'list.json'}: a JSON schema is an object, found list")]:
        r = run("generate", "-m", "/nonexistent/model.gguf", "-p", "x", "--json-schema", arg, cwd=repo_root)
        assert r.returncode == 1 and r.stderr.startswith("dpllama: error: " + message), r.stderr
        assert r.stderr.count("\n") == 1 and not r.stdout, r.stderr


def test_tokenize_prints_ids(repo_root):
    d = llama2c_dir()
    r = run("tokenize", "-z", d / "tokenizer.bin", "Once upon a time", cwd=repo_root)
    assert r.returncode == 0 and r.stdout.split() == ["1", "9038", "2501", "263", "931"]


@pytest.mark.parametrize("args, message", [
    (("generate", "-m", "/nonexistent/model.bin"), "/nonexistent/model.bin: model file not found"),
    (("generate", "-m", "{model}", "-z", "{d}/tokenizer.bin"), "tokenizer has 32000 tokens but the model's vocab_size is 512"),
    (("generate", "-m", "{d}/tok512.bin", "-z", "{d}/tok512.bin"), "tok512.bin"),
    (("generate", "-m", "{model}", "-z", "{tok}", "-n", "-3"), "-n must be >= 0"),
    (("generate", "-m", "{model}", "-z", "{tok}", "--top-p", "1.5"), "top-p must be between 0 and 1"),
    (("pull", "llama-7b"), "unknown model 'llama-7b'"),
    (("bench", "-m", "{model}", "--batch", "1,0"), "--batch takes sequence counts >= 1"),
    (("bench", "-m", "{model}", "--batch", "eight"), "--batch takes sequence counts >= 1"),
])
def test_bad_input_is_one_line_error(stories, repo_root, args, message):
    d, model, tok = stories
    args = [a.format(d=d, model=model, tok=tok) for a in args]
    r = run(*args, cwd=repo_root)
    assert r.returncode == 1
    assert r.stderr.startswith("dpllama: error:") and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


@pytest.fixture
def beside(stories, tmp_path):
    """stories260K.bin in a folder of its own (nothing beside it), and a text file named .gguf."""
    (tmp_path / "text.gguf").write_text("hello\n")
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "stories260K.bin").write_bytes(stories[1].read_bytes())
    return tmp_path


@pytest.mark.parametrize("args, start, words", [
    (("generate", "-m", "{tmp}"), "{tmp}: is a folder", ()),
    (("quantize", "{tmp}", "{tmp}/out.gguf"), "{tmp}: is a folder", ()),
    (("generate", "-m", "{tmp}/text.gguf", "-z", "{tok}"), "{tmp}/text.gguf: not a GGUF file", ("expected b'GGUF'",)),
    (("generate", "-m", "{tmp}/alone/stories260K.bin"), "{tmp}/alone/stories260K.bin: ", ("beside", "-z")),
    (("generate", "-m", "{model}"), "{model}: ", ("beside", "-z", "32000")),   # the folder's tokenizer.bin: not its
    (("tokenize", "-m", "{model}", "Once"), "{model}: ", ("beside", "-z", "32000")),
])
def test_errors_say_what_is_wrong(stories, beside, args, start, words):
    """A folder is not "not found", a text file named .gguf is not a llama2.c header, and the tokenizer the user
    did not give is named as the one looked for beside the model, with -z to give another."""
    d, model, tok = stories
    fill = dict(tmp=beside, model=model, tok=tok)
    r = run(*[a.format(**fill) for a in args])
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("dpllama: error: " + start.format(**fill)), r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_tokenize_takes_a_llama2c_model_with_its_tokenizer_beside(stories, beside):
    """As its help says, and as generate finds the tokenizer: tokenizer.bin beside the model."""
    (beside / "alone" / "tokenizer.bin").write_bytes(stories[2].read_bytes())
    r = run("tokenize", "-m", beside / "alone" / "stories260K.bin", "Once upon")
    assert r.returncode == 0 and r.stdout.split() == run("tokenize", "-z", stories[2], "Once upon").stdout.split()


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("args, message", [
    (("-n", "-5"), "-n must be >= 0, found -5"),
    (("--top-p", "2"), "sampling: top-p must be between 0 and 1, found 2.0"),
    (("-t", "-1"), "sampling: temperature must be >= 0 and at most 3.403e+38 (float32's largest), found -1.0"),
    (("-t", "nan"), "sampling: temperature must be >= 0 and at most 3.403e+38 (float32's largest), found nan"),
    (("--repeat-penalty", "nan", "-t", "0.8"), "sampling: repeat-penalty must be > 0 and at most 3.403e+38 (float32's largest), found nan"),
    (("--top-k", "-1"), "sampling: top-k must be >= 0, found -1"),
    (("--ctx", "0"), "--ctx must be at least 1, found 0"),
])
def test_bad_arguments_fail_before_the_model_loads(command, args, message):
    """The model does not even exist: the argument's error comes first, not after a load of up to minutes."""
    r = run(command, "-m", "/nonexistent/model.bin", *args)
    assert r.returncode == 1 and r.stderr == f"dpllama: error: {message}\n", r.stderr


def test_llama_cpp_habits():
    """-c/--ctx-size as llama.cpp's, --temp as a listed alias (not a prefix of --temperature), a warning for
    -t with what looks like a thread count, and a bad value with generate's usage, not the top level's."""
    from dpllama.cli import parser
    for flag in ("-c", "--ctx", "--ctx-size"):
        words = ["generate", "-m", "x", flag, "64"]
        assert parser(words).parse_args(words).ctx == 64
    assert "--temp T" in run("generate", "--help").stdout
    warned = run("generate", "-m", "/nonexistent/model.bin", "-t", "4")
    assert warned.stderr.splitlines()[0] == ("dpllama: warning: -t 4 is the sampling temperature (llama2.c's -t), "
                                              "not a thread count (llama.cpp's -t); --temperature 4 says it "
                                              "without this warning")
    for args in (("-t", "1"), ("-t", "4.0"), ("--temperature", "4"), ("--temp", "4")):
        r = run("generate", "-m", "/nonexistent/model.bin", *args)
        assert r.stderr.startswith("dpllama: error:") and "warning" not in r.stderr, args
    for args in (("-c", "abc"), ("--bogus",)):
        r = run("generate", "-m", "x", *args)
        assert r.returncode == 2 and r.stderr.startswith("usage: dpllama generate"), r.stderr


def test_chat_answers_on_stdin(repo_root):
    path = smollm2_gguf_path()
    r = run("chat", "-m", path, "-t", 0, "--ctx", 256, cwd=repo_root,
            stdin="What is the capital of France?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris."


@pytest.fixture(scope="module")
def qwen3_chat(tmp_path_factory):
    """A tiny Qwen3 GGUF with Qwen3's chat template (thinking unless enable_thinking is false), and a function that
    gives the token ids of a user's message in that template, `tail` after the reply's start."""
    from dpllama.tokenizer import load_gguf_tokenizer
    path = tmp_path_factory.mktemp("qwen3") / "qwen3_chat.gguf"
    tiny_qwen3(path, QWEN3_CHAT_TEMPLATE)
    tok = load_gguf_tokenizer(path)
    return path, lambda user, tail: tok.encode(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{tail}",
                                               bos=False, parse_special=True)


def test_chat_template_kwargs_reach_the_template(qwen3_chat):
    """Chat's template_kwargs are extra variables of the chat template: Qwen3's reply starts with its thinking
    left empty under enable_thinking false. One of the template's own is refused before the first message."""
    import dpllama
    from dpllama.chat import Chat
    from dpllama.errors import DpllamaError
    from dpllama.generate import Sampler
    path, ids = qwen3_chat
    llm = dpllama.load(str(path))
    for kwargs, tail in ((None, ""), ({"enable_thinking": True}, ""), ({"enable_thinking": False}, NO_THINKING)):
        chat = Chat(llm, Sampler(temperature=0), max_reply=2, template_kwargs=kwargs)
        "".join(chat.reply("Hi"))
        assert chat.last.tokens[:chat.last.prompt_len] == ids("Hi", tail), kwargs
    with pytest.raises(DpllamaError, match="^add_generation_prompt is the chat template's own variable"):
        Chat(llm, Sampler(temperature=0), template_kwargs={"add_generation_prompt": False})


@pytest.mark.parametrize("flag, tail", [((), ""), (("--chat-template-kwargs", '{"enable_thinking": false}'),
                                                   NO_THINKING)])
def test_chat_template_kwargs_option(qwen3_chat, repo_root, flag, tail):
    """--chat-template-kwargs reaches the template. The chat shows no prompt; the refusal of a message too long for
    the context counts its tokens in the template."""
    path, ids = qwen3_chat
    message = "x" * 80      # more tokens than the tiny Qwen3's 64 positions
    r = run("chat", "-m", path, "-t", 0, "-n", 2, *flag, cwd=repo_root, stdin=message + "\n")
    assert r.returncode == 0, r.stderr
    assert f"with no earlier exchange it is {len(ids(message, tail))} tokens in the chat template" in r.stderr, \
        r.stderr


@pytest.mark.parametrize("value, message", [
    ("{enable_thinking: false}", "must be a JSON object, found '{enable_thinking: false}' (not JSON: Expecting "
                                 "property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ('["enable_thinking"]', """must be a JSON object, found '["enable_thinking"]'"""),
    ('"enable_thinking"', """must be a JSON object, found '"enable_thinking"'"""),
    ('{"bos_token": ""}', """'{"bos_token": ""}': bos_token is the chat template's own variable, which dpllama sets"""),
])
def test_chat_template_kwargs_option_is_an_object_of_extra_variables(value, message):
    r = run("chat", "-m", "/nonexistent/model.bin", "--chat-template-kwargs", value)
    assert r.returncode == 1 and r.stderr == f"dpllama: error: --chat-template-kwargs {message}\n", r.stderr


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    """A random llama2.c model for tok512.bin whose greedy replies run to the 4,000-token limit: seconds of
    reply in which to press Ctrl-C."""
    path = tmp_path_factory.mktemp("chatty") / "chatty.bin"
    random_llama2c(path, dim=128, hidden=384, n_layers=2, n_heads=4, n_kv_heads=4, vocab=512, seq_len=4096)
    return ["chat", "-m", path, "-z", llama2c_dir() / "tok512.bin", "-t", 0, "-n", 4000]


@pytest.mark.parametrize("template, kind, note", [
    ("{{ messages }}", "gpt2", "chat template: the model's own"),
    (None, "llama2c", "chat template: ChatML, as a llama2.c model has none of its own"),
    (None, "spm", "chat template: ChatML, as the model has none of its own"),
])
def test_chat_names_its_template(template, kind, note):
    from types import SimpleNamespace

    from dpllama.commands.chat import template_note
    assert template_note(SimpleNamespace(chat_template=template, kind=kind)) == note


def start(*args, cwd=None):
    """The command with pipes; a crash prints every thread's Python stack on stderr, for the test's message."""
    return subprocess.Popen([sys.executable, "-m", "dpllama.cli", *map(str, args)], cwd=cwd, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONFAULTHANDLER="1"))


def wait_readable(stream, seconds=60):
    assert select.select([stream], [], [], seconds)[0], "timed out"


def test_chat_ctrl_c_stops_the_reply_not_the_chat(chatty, repo_root):
    """SIGINT during a reply ends that reply, says so, and the chat goes on (here: /reset, answered, then the end
    of input quits, exit 0). At the start the chat says which template it uses."""
    p = start(*chatty, cwd=repo_root)
    p.stdin.write(b"Hello\n")
    p.stdin.flush()
    wait_readable(p.stdout)         # the reply has begun
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(b"/reset\n", timeout=60)
    assert p.returncode == 0, err
    assert err.decode().splitlines()[-3:] == ["dpllama: chat template: ChatML, as a llama2.c model has none of its own",
                                              "dpllama: reply stopped (Ctrl-C); Ctrl-C at the prompt quits",
                                              "dpllama: the conversation starts over"]
    assert len(out) < 3000          # well short of the 4,000 tokens it was going to say


def test_chat_ctrl_c_is_acted_on_between_tokens(stories):
    """A SIGINT during a reply is noted and the reply stops after the piece being written, not wherever the token
    loop happened to be (inside the runtime, between a launch and the host's record of it): the chat goes on
    with the model whole, and the next reply is the one a chat that was cut there cleanly gives."""
    import io

    import dpllama
    from dpllama.chat import Chat
    from dpllama.commands.chat import repl
    from dpllama.generate import Sampler

    class PressAt(io.StringIO):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def write(self, text):
            self.n -= 1
            if self.n == 0:
                signal.raise_signal(signal.SIGINT)
            return super().write(text)

    _, model, tok = stories
    llm = dpllama.load(str(model), str(tok))
    out, err = PressAt(5), io.StringIO()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        repl(llm, Sampler(temperature=0), None, 40, io.StringIO("Tell me a story\nAnd then?\n"), out, err)
    finally:
        signal.signal(signal.SIGINT, previous)
    chat = Chat(llm, Sampler(temperature=0), max_reply=40)
    with contextlib.closing(chat.reply("Tell me a story")) as pieces:
        cut = "".join(next(pieces) for _ in range(5))
    assert out.getvalue() == f"{cut}\n{''.join(chat.reply('And then?'))}\n"
    assert err.getvalue().count("reply stopped (Ctrl-C)") == 1


def test_chat_refuses_a_message_longer_than_the_context_and_goes_on(stories):
    """A message that cannot fit the context even alone is refused with one line; the conversation before it stays
    and the chat answers the next message as it would have without the long one."""
    import io

    import dpllama
    from dpllama.commands.chat import repl
    from dpllama.generate import Sampler

    _, model, tok = stories
    llm = dpllama.load(str(model), str(tok), max_seq=64)
    out, err = io.StringIO(), io.StringIO()
    repl(llm, Sampler(temperature=0), None, 8, io.StringIO("Hi\n" + "story " * 100 + "\nAnd then?\n"), out, err)
    refused = [line for line in err.getvalue().splitlines() if "not sent" in line]
    assert len(refused) == 1 and "does not fit the context" in refused[0] and "holds 64" in refused[0], err.getvalue()
    alone, _ = io.StringIO(), io.StringIO()
    repl(llm, Sampler(temperature=0), None, 8, io.StringIO("Hi\nAnd then?\n"), alone, _)
    assert out.getvalue() == alone.getvalue() and out.getvalue().count("\n") == 2


def test_chat_ctrl_c_at_the_prompt_quits(chatty, repo_root):
    p = start(*chatty, cwd=repo_root)
    deadline = time.monotonic() + 60
    err = b""
    while b"chat template" not in err:     # the prompt is next
        wait_readable(p.stderr, deadline - time.monotonic())
        err += os.read(p.stderr.fileno(), 4096)
    time.sleep(0.3)                         # to be waiting for a line
    p.send_signal(signal.SIGINT)
    out, rest = p.communicate(timeout=30)
    assert p.returncode == 0 and out == b"" and b"interrupted" not in rest, err + rest


def test_chat_on_a_terminal_edits_lines_with_readline(chatty, repo_root):
    """On a terminal the chat reads lines through readline: the up arrow brings the last line back; Ctrl-D quits."""
    pytest.importorskip("readline")
    terminal, child_side = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "dpllama.cli", *map(str, chatty)], cwd=repo_root,
                         stdin=child_side, stdout=child_side, stderr=subprocess.PIPE, env=dict(os.environ, TERM="xterm"))
    os.close(child_side)
    shown = b""
    try:
        for prompts, keys in enumerate([b"/reset\r", b"\x1b[A\r", b"\x04"], start=1):
            while shown.count(b"> ") < prompts:     # typed at the prompt, as a person would, not ahead of it
                wait_readable(terminal)
                shown += os.read(terminal, 4096)
            os.write(terminal, keys)
        _, err = p.communicate(timeout=60)
    finally:
        os.close(terminal)
    assert p.returncode == 0 and err.decode().count("dpllama: the conversation starts over\n") == 2, shown + err
