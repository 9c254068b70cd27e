"""Tool calls: `dpllama serve` with OpenAI's `tools`, driven with the official client against a scripted model whose
greedy replies are chosen (tests/test_serve.py's scripted_gguf) and a chat template that renders tools and writes
calls as Hermes's <tool_call> blocks, as Qwen2.5's and Qwen3's do: calls taken out of the reply whole and streamed,
tags cut across tokens, parallel calls, blocks that are no call, forced calls held to the functions' schemas,
a conversation's past calls and results in the template, and the 400s."""
from __future__ import annotations

import json

import jsonschema
import pytest

from dpllama.tokenizer import load_gguf_tokenizer
from tests.serving import Server
from tests.test_serve import scripted_gguf, streamed

openai = pytest.importorskip("openai", reason="the official client the tests drive the server with")
http = pytest.importorskip("httpx2", reason="openai's HTTP client, for what the openai client does not send")

CALL_WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
# each reply follows the prompt's last token (a script's first); a token appears in one script only
SCRIPTS = {"T": ["T", "Let me check.", " <tool_call>\n", '{"name": "get_weather", "arguments": ', '{"city": "Paris"}}',
                 "\n</tool_call>", "<|im_end|>"],
           "S": ["S", "Sure", "\n<tool", "_call>\n{", '"name": "get_weather", "arguments": {"city": "Nice"}}\n</tool_',
                 "call>\n\n", "<|im_end|>"],
           "P": ["P", CALL_WEATHER, " \n",
                 '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>', "<|im_end|>"],
           "B": ["B", "<tool_call>\n{not json}\n</tool_call>", "<|im_end|>"],
           "U": ["U", '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>', "<|im_end|>"],
           # calls written bare, as Qwen2.5-Coder writes them: at the reply's start or after a call, not in prose
           "J": ["J", '\n{"name": "get_time", ', '"arguments": {"tz": "UTC"}}', "\n\n\n", '{"name": "get_weather", '
                 '"arguments": {"city": "Lima"}}', "<|im_end|>"],
           "K": ["K", '{"answer": 42}', "<|im_end|>"],
           "M": ["M", "Result:", ' {"name": "get_time", "arguments": {"tz": "CET"}}', "<|im_end|>"],
           # a forced call's prompt ends in "<tool_call>\n"
           "\n": ["\n", '{"name": "get_weather", "arguments": {"city": "Oslo"}}', "<|im_end|>"]}
# tools by name, the conversation's text with each call's arguments as JSON and each result after its call's id
TEMPLATE = ("{% if tools %}{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
            "{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }}"
            "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% endif %}"
            "{% if m.role == 'tool' %}{{ m.tool_call_id }}={% endif %}{{ m['content'] }}{% endfor %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
TOOLS = [WEATHER, TIME]


@pytest.fixture(scope="module")
def tooler(tmp_path_factory):
    path = tmp_path_factory.mktemp("tooler") / "tooler.gguf"
    scripted_gguf(path, SCRIPTS, TEMPLATE, tags=(), seq_len=256)
    with Server("-m", str(path), "--model-name", "tooler", "--parallel", "2") as s:
        s.path = path
        yield s


def ask(script: str, **kw) -> dict:
    return {"model": "tooler", "messages": [{"role": "user", "content": script}], "temperature": 0, "tools": TOOLS,
            **kw}


def calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def streamed_calls(client, **kw) -> tuple[str, list[tuple[str, dict]], str, list]:
    """A streamed reply's content, its calls (from tool_calls deltas, joined by index as clients join them), its
    finish reason and chunks."""
    content, finish, chunks = streamed(client, **kw)
    joined: dict[int, dict] = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            call = joined.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
            assert d.id is None or d.id == call["id"] and d.type in (None, "function")
    assert all(call["id"].startswith("call_") for call in joined.values()), joined
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(joined.items())], finish, chunks


def test_calls_are_taken_out_of_the_reply(tooler):
    """A reply's <tool_call> blocks are tool_calls (arguments as JSON text, ids call_...), the text around them the
    content, finish_reason "tool_calls"; streamed, the same content and calls, whatever tokens the tags were cut
    into; two blocks, two calls (parallel_tool_calls false: the first, the second left as text); calls written as
    bare JSON at the reply's start or after a call (not after other text); a block or object that is no JSON or
    names no tool is content, as the model wrote it; tool_choice "none" leaves the tools out."""
    client = tooler.client()
    for script, content, want in [("T", "Let me check.", [("get_weather", {"city": "Paris"})]),
                                  ("S", "Sure", [("get_weather", {"city": "Nice"})]),
                                  ("P", None, [("get_weather", {"city": "Rome"}), ("get_time", {"tz": "CET"})]),
                                  ("J", None, [("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Lima"})])]:
        done = client.chat.completions.create(**ask(script)).choices[0]
        assert (done.message.content, calls(done.message), done.finish_reason) == (content, want, "tool_calls"), done
        assert len({c.id for c in done.message.tool_calls}) == len(want)
        text, got, finish, _ = streamed_calls(client, **ask(script))
        assert (text, got, finish) == (content or "", want, "tool_calls"), script
    done = client.chat.completions.create(**ask("P", parallel_tool_calls=False)).choices[0]
    assert calls(done.message) == [("get_weather", {"city": "Rome"})] and done.finish_reason == "tool_calls"
    assert done.message.content == " \n" + SCRIPTS["P"][3], done     # the text between the blocks too
    for script in ("B", "U", "K", "M"):
        content = "".join(SCRIPTS[script][1:-1])
        done = client.chat.completions.create(**ask(script)).choices[0]
        assert (done.message.content, done.message.tool_calls, done.finish_reason) == (content, None, "stop")
        text, got, finish, _ = streamed_calls(client, **ask(script))
        assert (text, got, finish) == (content, [], "stop")
    done = client.chat.completions.create(**ask("T", tool_choice="none")).choices[0]
    assert done.message.tool_calls is None and done.message.content.startswith("Let me check. <tool_call>"), done
    # cut short inside a block: no call, the text as it came, finish_reason "length"
    done = client.chat.completions.create(**ask("T", max_tokens=3)).choices[0]
    assert (done.message.content, done.message.tool_calls, done.finish_reason) == (
        "Let me check. <tool_call>\n" + SCRIPTS["T"][3], None, "length"), done


def test_forced_calls_follow_the_functions_schemas(tooler):
    """tool_choice "required" or a named function: the reply is one call, its JSON held to the functions' schema
    from its first token (the prompt ends in "<tool_call>\\n"): the model's own call where it fits, and where the
    named function is another one, that function's call, its arguments as its parameters admit."""
    client = tooler.client()
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        done = client.chat.completions.create(**ask("x", tool_choice=choice)).choices[0]
        assert calls(done.message) == [("get_weather", {"city": "Oslo"})] and done.finish_reason == "tool_calls"
        assert done.message.content is None, done
        text, got, finish, _ = streamed_calls(client, **ask("x", tool_choice=choice))
        assert (text, got, finish) == ("", [("get_weather", {"city": "Oslo"})], "tool_calls")
    done = client.chat.completions.create(**ask("x", tool_choice={"type": "function", "function": {"name": "get_time"}},
                                                max_tokens=200)).choices[0]
    (name, arguments), = calls(done.message)
    assert name == "get_time" and done.finish_reason == "tool_calls", done
    jsonschema.validate(arguments, TIME["function"]["parameters"])


def test_past_calls_and_results_reach_the_template(tooler):
    """An assistant's tool_calls (arguments sent as JSON text, as OpenAI's clients send them) reach the template
    with their arguments as objects, a tool message with its tool_call_id, content null beside calls: the prompt's
    tokens are the conversation's as the template writes it."""
    tok = load_gguf_tokenizer(tooler.path)
    client = tooler.client()
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "user", "content": "T"}]
    done = client.chat.completions.create(model="tooler", messages=messages, tools=TOOLS, temperature=0)
    text = 'get_weather;get_time;Weather?<tool_call>get_weather{"city": "Paris"}</tool_call>call_1=sunnyT'
    assert done.usage.prompt_tokens == len(tok.encode(text, parse_special=True)), done.usage
    assert calls(done.choices[0].message) == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("change, param, message", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "x(?=y)"}}}}}], "tool_choice": "required"},
     "tools", 'tools: a function\'s parameters: #/$defs/f0/properties/a: "pattern": a lookaround'),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "tool_choice names 'nope', which is none of the tools"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice", "tool_choice asks for a call, and there are no tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "tools: two functions have the same name"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name",
     "tools[0].function.name: String should match pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f", "returns": {}}}]}, "tools[0].function.returns",
     "tools[0].function.returns: Extra inputs are not permitted"),
    ({"response_format": {"type": "json_object"}}, "response_format",
     "response_format: a JSON reply and tools at once are not supported"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "messages[0].content is required"),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls",
     "only an assistant's message has tool_calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments", "messages[0].tool_calls[0].function.arguments should be a JSON"),
])
def test_bad_tool_requests_are_400_naming_the_parameter(tooler, change, param, message):
    r = http.post(f"{tooler.url}/v1/chat/completions", json={**ask("T"), **change}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["error"]["message"].startswith(message), r.text


def test_templates_without_tools_refuse_them(tmp_path):
    """A model whose chat template does not write <tool_call> blocks refuses tools with a 400 naming them; tools: []
    and tool_choice "none" ask for nothing, and are served."""
    path = tmp_path / "plain.gguf"
    scripted_gguf(path, {"T": ["T", "Hi", "<|im_end|>"]}, "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                  tags=())
    with Server("-m", str(path), "--model-name", "tooler") as s:
        r = http.post(f"{s.url}/v1/chat/completions", json=ask("T"), timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
        assert r.json()["error"]["message"].startswith("tools: this model's chat template renders no tools")
        for change in ({"tools": []}, {"tool_choice": "none"}):
            r = http.post(f"{s.url}/v1/chat/completions", json={**ask("T"), **change}, timeout=60)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hi", r.text


# Llama 3's way, abridged: the tools and what a call looks like in the prompt, a past call written as its bare JSON
# (one call a turn), a result as an ipython turn
LLAMA3_TEMPLATE = ("{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}"
                   "Call one as {\"name\": function name, \"parameters\": its arguments}.{% endif %}"
                   "{% for m in messages %}{% if 'tool_calls' in m %}{% set c = m.tool_calls[0].function %}"
                   "{\"name\": \"{{ c.name }}\", \"parameters\": {{ c.arguments | tojson }}}"
                   "{% elif m.role == 'tool' %}ipython:{{ m.content }}{% else %}{{ m.content }}{% endif %}{% endfor %}")
LLAMA3_SCRIPTS = {"L": ["L", '{"name": "get_weather", ', '"parameters": {"city": "Oslo"}}', "<|im_end|>"],
                  "F": ["F", '{"name": "get_time", "parameters": {"tz": "UTC"}}', "<|im_end|>"],
                  "N": ["N", "No call.", "<|im_end|>"]}


def test_llama3_style_calls(tmp_path):
    """A template that renders tools without <tool_call> tags, as Llama 3's: a reply that is a bare object with
    "parameters" is a call, whole and streamed; prose is content; tool_choice "required" or named holds the reply to
    {"name", "parameters"} from its first token (no tag added to the prompt), the named function's where the model
    wanted another; a past call and its result reach the template."""
    path = tmp_path / "llama3.gguf"
    scripted_gguf(path, LLAMA3_SCRIPTS, LLAMA3_TEMPLATE, tags=(), seq_len=1024)    # the tools in bytes: 400 tokens
    with Server("-m", str(path), "--model-name", "tooler") as s:
        client = s.client()
        done = client.chat.completions.create(**ask("L")).choices[0]
        assert (done.message.content, calls(done.message), done.finish_reason) == (
            None, [("get_weather", {"city": "Oslo"})], "tool_calls"), done
        assert streamed_calls(client, **ask("L"))[1:3] == ([("get_weather", {"city": "Oslo"})], "tool_calls")
        done = client.chat.completions.create(**ask("N")).choices[0]
        assert (done.message.content, done.message.tool_calls, done.finish_reason) == ("No call.", None, "stop")
        done = client.chat.completions.create(**ask("F", tool_choice="required")).choices[0]
        assert calls(done.message) == [("get_time", {"tz": "UTC"})] and done.finish_reason == "tool_calls", done
        done = client.chat.completions.create(**ask("F", tool_choice={"type": "function", "function": {
            "name": "get_weather"}}, max_tokens=200)).choices[0]
        (name, arguments), = calls(done.message)
        assert name == "get_weather" and done.finish_reason == "tool_calls", done
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])
        history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]},
                   {"role": "tool", "tool_call_id": "c", "content": "12:00"}, {"role": "user", "content": "L"}]
        done = client.chat.completions.create(model="tooler", messages=history, tools=TOOLS, temperature=0)
        text = "".join(json.dumps(t) for t in TOOLS) + ('Call one as {"name": function name, "parameters": its '
                                                        'arguments}.x{"name": "get_time", "parameters": {"tz": "CET"}}'
                                                        'ipython:12:00L')
        assert done.usage.prompt_tokens == len(load_gguf_tokenizer(path).encode(text, parse_special=True))


def test_qwen_calls_a_tool_and_reads_its_result():
    """Qwen2.5-Coder-0.5B (its own template: the tools in the system prompt, calls and results as it writes them):
    asked for Paris's weather it calls get_weather with Paris, greedy, whether it may choose (auto: it writes the
    call as bare JSON) or must (required: held to the schema); the call and a result sent back render through the
    template: the reply has the result's 18 (the 0.5B model echoes it beside calling again)."""
    from tests.helpers import qwen_gguf_path
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}}]
    ask_weather = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    with Server("-m", str(qwen_gguf_path()), "--model-name", "qwen", "--ctx", "1024") as s:
        client = s.client()
        for choice in ("auto", "required"):
            done = client.chat.completions.create(model="qwen", messages=ask_weather, tools=tools, tool_choice=choice,
                                                  temperature=0, max_tokens=100).choices[0]
            (name, arguments), = calls(done.message)
            assert name == "get_weather" and arguments["city"] == "Paris" and done.finish_reason == "tool_calls"
        call = done.message.tool_calls[0]
        messages = ask_weather + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                                  {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}]
        done = client.chat.completions.create(model="qwen", messages=messages, tools=tools, temperature=0,
                                              max_tokens=60).choices[0]
        assert "18" in json.dumps(done.message.model_dump()), done


def test_a_reply_split_anywhere_gives_the_same_content_and_calls():
    """ToolCalls on random replies (text, whitespace, tags whole and cut, calls, bare calls, blocks that are no call,
    stray braces) pushed in random pieces gives the content and calls that the whole reply gives at once; and a
    reply of calls alone gives no content."""
    import random
    from dpllama.serve.tools import ToolCalls
    parts = ["Hi", " ", "\n", "<tool_call>", "</tool_call>", "<tool_", '{"name": "f", "arguments": {"a": 1}}',
             '{"name": "g", "arguments": {}}', '{"name": "h"}', "{", "}", '"x"', "{not json}", "</tool", "call>"]

    def run(pieces: list[str], single: bool) -> tuple[str, list]:
        tools, content, calls = ToolCalls({"f", "g"}, single=single), "", []
        for k, piece in enumerate(pieces):
            text, made = tools.push(piece, final=k == len(pieces) - 1)
            content += text
            calls += [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in made]
        return content, calls
    rng = random.Random(5)
    for _ in range(2000):
        reply = "".join(rng.choice(parts) for _ in range(rng.randrange(1, 12)))
        cuts = sorted(rng.sample(range(1, len(reply)), min(len(reply) - 1, rng.randrange(6)))) if len(reply) > 1 else []
        pieces = [reply[a:b] for a, b in zip([0] + cuts, cuts + [len(reply)])] + [""]
        for single in (False, True):
            assert run(pieces, single) == run([reply], single), (reply, pieces)
    content, calls = run(['\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n', '{"name": "g", "arguments": '
                          '{}}\n'], False)
    assert content == "" and [name for _, name, _ in calls] == ["f", "g"]
