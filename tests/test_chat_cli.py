"""The terminal chat, driven through StringIO against a fake model with scripted logits."""
import io
import random
import re

import numpy as np
import pytest

from cpuinfer.chat_cli import (EXIT_HINT, THINK_FOOTER, THINK_HEADER, ChatOptions, ThinkSplitter,
                               run_chat)
from cpuinfer.chat_template import render_chat
from cpuinfer.errors import CpuinferError
from cpuinfer.sampling import SamplerParams

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PIECES = ["<th", "ink>", "</", "think>", "</think>", "<think>", "\n\n"]


class FakeTokenizer:
    """Specials, multi-character pieces, printable ASCII and 'é' as its two UTF-8 bytes."""

    def __init__(self):
        chars = [chr(c) for c in range(32, 127)] + ["\n"]
        self.vocab: list[bytes] = [t.encode() for t in SPECIALS + PIECES + chars]
        self.vocab += [b"\xc3", b"\xa9"]
        self.index = {v.decode(): i for i, v in enumerate(self.vocab[:-2])}
        self.bos_id, self.eos_id = 0, 1
        self.stop_ids = frozenset({1})
        self.add_bos = False

    def id(self, s: str) -> int:
        return self.index[s]

    def ids(self, text: str) -> list[int]:
        """One id per character (how the tests script replies)."""
        return [self.index[c] for c in text]

    def encode(self, text, special=False, add_bos=False):
        assert special is True and add_bos is False
        out, i = [], 0
        while i < len(text):
            for s in SPECIALS + sorted(PIECES, key=len, reverse=True):
                if text.startswith(s, i):
                    out.append(self.index[s])
                    i += len(s)
                    break
            else:
                if text[i] == "é":
                    out += [len(self.vocab) - 2, len(self.vocab) - 1]
                else:
                    out.append(self.index[text[i]])
                i += 1
        return out

    def piece(self, tid):
        return self.vocab[tid]

    def decode(self, ids):
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", "replace")

    def token_text(self, tid):
        return self.vocab[tid].decode("utf-8", "replace")


INTERRUPT = -1


class FakeSession:
    def __init__(self, model):
        self.model = model
        self.tokens: list[int] = []
        self.truncated = False

    def eval(self, ids):
        m = self.model
        ids = list(ids)
        if len(self.tokens) + len(ids) > m.n_ctx:
            raise CpuinferError("context full")
        if m.script and m.script[0] == INTERRUPT:
            m.script.pop(0)
            raise KeyboardInterrupt
        m.evals.append(ids)
        if self.truncated:               # the chat truncates before each prompt evaluation
            m.prompts.append(ids)
            self.truncated = False
        self.tokens.extend(ids)
        logits = np.zeros(m.n_vocab, np.float32)
        logits[m.script.pop(0)] = 10.0
        return logits

    def truncate(self, n):
        self.model.truncations.append(n)
        self.truncated = True
        del self.tokens[n:]

    def reset(self):
        self.model.resets += 1
        self.tokens.clear()


class FakeModel:
    arch = "fake"
    kv_bytes_per_token = 1024

    def __init__(self, replies=(), n_ctx=512, chat_template=None):
        self.tokenizer = FakeTokenizer()
        self.n_vocab = len(self.tokenizer.vocab)
        self.n_ctx = n_ctx
        self.chat_template = chat_template
        self.script: list[int] = []
        for r in replies:            # a reply: text (one token per character) or a list of ids
            self.script += (self.tokenizer.ids(r) if isinstance(r, str) else list(r)) + [1]
        self.evals: list[list[int]] = []
        self.prompts: list[list[int]] = []     # the prompt part of each turn that was evaluated
        self.truncations: list[int] = []
        self.resets = 0
        self.sessions = 0

    def new_session(self):
        self.sessions += 1
        return FakeSession(self)


GREEDY = SamplerParams(temperature=0.0)


def chat(model, user_input, **opts):
    opts.setdefault("sampler", GREEDY)
    out, err = io.StringIO(), io.StringIO()
    rc = run_chat(model, ChatOptions(**opts), stdin=io.StringIO(user_input), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def chatml(messages):
    return render_chat(None, messages)


def test_multi_turn_reuses_the_kv_cache_prefix():
    m = FakeModel(["Hello!", "Fine."])
    rc, out, err = chat(m, "Hi\nHow are you?\n/bye\n")
    assert rc == 0
    assert "Hello!\n" in out and "Fine.\n" in out
    tok = m.tokenizer
    p1 = tok.encode(chatml([{"role": "user", "content": "Hi"}]), special=True)
    p2 = tok.encode(chatml([{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": "How are you?"}]), special=True)
    reply1 = tok.ids("Hello!")
    assert m.evals[0] == p1
    assert m.evals[1:7] == [[t] for t in reply1]     # the last sampled token is evaluated too
    cached = len(p1) + len(reply1)
    assert p2[:cached] == p1 + reply1
    assert m.truncations[-1] == cached              # the whole first turn was kept
    assert m.evals[7] == p2[cached:]                # only the new tokens were evaluated
    assert m.sessions == 1
    assert re.search(r"prompt: \d+ tokens, .* \| reply: 6 tokens", err)


def test_clear_forgets_conversation_and_cache():
    m = FakeModel(["A", "B"])
    rc, out, err = chat(m, "one\n/clear\ntwo\n")
    assert rc == 0 and m.resets == 1 and "Cleared" in err
    assert m.prompts[-1] == m.tokenizer.encode(chatml([{"role": "user", "content": "two"}]),
                                             special=True)


def test_set_commands():
    m = FakeModel(["abcdef", "xyz"])
    rc, out, err = chat(m, "/set temp 0.7\n/set top_p 1.5\n/set top_k x\n/set max_tokens 2\n"
                           "/set system Be brief.\n/show\nq\n/set max_tokens 0\n/set seed 3\n"
                           "/frob\n/set\n/?\nr\n")
    assert rc == 0
    assert "Set temperature to 0.7." in err
    assert "--top-p must be in (0, 1], got 1.5" in err
    assert "top_k needs an integer, got 'x'" in err
    assert "temperature 0.7, top_k 40, top_p 0.95" in err       # /show after the failed sets
    assert "system: 'Be brief.'" in err
    assert "Unknown command '/frob'. Type /? for help" in err
    assert "Usage: /set" in err and "/set think on|off" in err
    assert "Set seed to 3." in err
    # temperature 0.7 with a one-hot 10-logit gap is still effectively certain
    assert "ab\n" in out and "abcdef" not in out                # max_tokens 2 cut the reply
    prompt2 = m.tokenizer.decode(m.prompts[-1])
    full = chatml([{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "q"}, {"role": "assistant", "content": "ab"},
                   {"role": "user", "content": "r"}])
    assert m.tokenizer.decode(m.tokenizer.encode(full, special=True)).endswith(prompt2)
    assert m.evals[0] == m.tokenizer.encode(chatml([{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "q"}]),
                                            special=True)


THINK_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
                  "{% endif %}")


def think_reply(tok):
    # "hmm.\n</think>\n\nYes é" with both the tag and 'é' split across tokens
    return (tok.ids("hm") + tok.ids("m.") + [tok.id("\n"), tok.id("</")] + tok.ids("th")
            + [tok.id("ink>"), tok.id("\n\n")] + tok.ids("Yes ") + [len(tok.vocab) - 2, len(tok.vocab) - 1])


def test_think_shown_apart_and_dropped_from_history():
    m = FakeModel(chat_template=THINK_TEMPLATE)
    m.script = think_reply(m.tokenizer) + [1] + m.tokenizer.ids("ok") + [1]
    rc, out, err = chat(m, "Q\nQ2\n", color=False)
    assert rc == 0
    assert f"{THINK_HEADER}\nhmm.\n{THINK_FOOTER}\n\nYes é\n" in out
    assert "</" not in out and "ink>" not in out
    history = m.tokenizer.decode(m.prompts[-1])   # what the second turn evaluated
    assert "hmm" not in history and "think>\n\n" not in history
    full = m.tokenizer.decode(m.tokenizer.encode(render_chat(THINK_TEMPLATE, [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "Yes é"},
        {"role": "user", "content": "Q2"}]), special=True))
    assert full.endswith(history)


def test_think_hidden_and_colored():
    m = FakeModel(chat_template=THINK_TEMPLATE)
    m.script = think_reply(m.tokenizer) + [1] + think_reply(m.tokenizer) + [1]
    rc, out, err = chat(m, "/set think off\nQ\n/set think on\nQ\n", color=True)
    first, second = out.split("Yes é", 1)
    assert "hmm" not in first and THINK_HEADER not in first
    assert f"\x1b[2m{THINK_HEADER}\nhmm.\n{THINK_FOOTER}\x1b[0m\n\n" in second
    assert "Thinking will be hidden." in err


def test_model_opened_think_split_across_tokens():
    m = FakeModel()
    tok = m.tokenizer
    m.script = ([tok.id("<th"), tok.id("ink>")] + tok.ids("x") + [tok.id("</think>"), tok.id("\n\n")]
                + tok.ids("Hi") + [1])
    rc, out, err = chat(m, "", prompt="q", hide_think=True)
    assert rc == 0 and out == "Hi\n"


@pytest.mark.parametrize("in_think", [False, True])
def test_think_splitter_any_split(in_think):
    text = ("" if in_think else "  <think>") + "\nlet me see < /think </thin\n</think>\n\nAnswer <think> x"
    rng = random.Random(5)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 12)))
        parts = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        sp = ThinkSplitter(in_think)
        segs = [s for p in parts for s in sp.feed(p)] + sp.flush()
        think = "".join(t for k, t in segs if k == "think")
        answer = "".join(t for k, t in segs if k == "answer")
        assert think == "\nlet me see < /think </thin\n"
        assert answer == "\n\nAnswer <think> x"
    sp = ThinkSplitter(False)
    assert sp.feed("No thinking") == [("answer", "No thinking")] and not sp.thought
    sp = ThinkSplitter(False)
    assert sp.feed("<thi") == [] and sp.flush() == [("answer", "<thi")]


def test_one_shot_is_plain():
    m = FakeModel(["Paris."])
    rc, out, err = chat(m, "", prompt="Capital of France?", system="Be terse.")
    assert rc == 0 and out == "Paris.\n" and err == ""
    assert m.evals[0] == m.tokenizer.encode(chatml([
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Capital of France?"}]), special=True)


def test_one_shot_think_plain_separation():
    m = FakeModel(chat_template=THINK_TEMPLATE)
    m.script = think_reply(m.tokenizer) + [1]
    rc, out, err = chat(m, "", prompt="Q")
    assert out == f"{THINK_HEADER}\nhmm.\n{THINK_FOOTER}\n\nYes é\n" and "\x1b" not in out


def test_context_full_is_a_message_not_a_crash():
    m = FakeModel(["a" * 100, "b"], n_ctx=40)
    rc, out, err = chat(m, "Hi\n")
    assert rc == 0
    assert "context full (40 tokens): /clear to start over" in err
    n_prompt = len(m.evals[0])
    assert out.count("a") == 40 - n_prompt + 1   # generated until the cache was full
    # a prompt that cannot fit at all
    m = FakeModel(["x"], n_ctx=10)
    rc, out, err = chat(m, "a long message that does not fit\n/show\n")
    assert rc == 0 and "context full (10 tokens)" in err and m.evals == []
    # one-shot: the CLI's one-line error (exit 1) that says what to change
    rc, out, err = chat(FakeModel(["x"], n_ctx=10), "", prompt="a long message")
    assert rc == 1 and err.startswith("cpuinfer: the prompt is") and "use a larger --ctx" in err


def test_ctrl_c_during_reply_keeps_partial_answer():
    m = FakeModel()
    tok = m.tokenizer
    m.script = tok.ids("Hel") + [INTERRUPT] + tok.ids("ok") + [1]
    rc, out, err = chat(m, "Hi\nMore\n")
    assert rc == 0
    assert "Hel\n" in out and "ok\n" in out
    second = tok.decode(m.prompts[-1])
    full = tok.decode(tok.encode(chatml([
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"},
        {"role": "user", "content": "More"}]), special=True))
    assert full.endswith(second) and len(second) < len(full)


def test_ctrl_c_during_prompt_eval_drops_the_turn():
    m = FakeModel()
    m.script = [INTERRUPT] + m.tokenizer.ids("ok") + [1]
    rc, out, err = chat(m, "Hi\nAgain\n")
    assert rc == 0 and "(interrupted)" in err
    assert m.evals[0] == m.tokenizer.encode(chatml([{"role": "user", "content": "Again"}]),
                                            special=True)


class InterruptingInput(io.StringIO):
    def __init__(self, text):
        super().__init__(text)
        self.raised = False

    def readline(self, *a):
        if not self.raised:
            self.raised = True
            raise KeyboardInterrupt
        return super().readline(*a)


def test_ctrl_c_at_prompt_and_eof():
    m = FakeModel(["Yo"])
    out, err = io.StringIO(), io.StringIO()
    rc = run_chat(m, ChatOptions(sampler=GREEDY), stdin=InterruptingInput("Hi\n"), stdout=out,
                  stderr=err)
    assert rc == 0                       # EOF after "Hi" ends the chat cleanly
    assert EXIT_HINT in err.getvalue() and "Yo\n" in out.getvalue()
    rc, out, err = chat(FakeModel(), "")
    assert rc == 0 and out.startswith(">>> ")


def test_multiline_input():
    m = FakeModel(["k"])
    rc, out, err = chat(m, '"""first\nsecond\nthird"""\n')
    assert m.evals[0] == m.tokenizer.encode(chatml([
        {"role": "user", "content": "first\nsecond\nthird"}]), special=True)
    assert "... " in out


def test_bad_template_is_reported():
    m = FakeModel(["x"], chat_template="{{ raise_exception('no system messages') }}")
    rc, out, err = chat(m, "Hi\n/bye\n")
    assert rc == 0 and "cpuinfer: chat template refused the conversation: no system messages" in err
    rc, out, err = chat(m, "", prompt="Hi")
    assert rc == 1


def test_bad_sampler_options_fail_fast():
    rc, out, err = chat(FakeModel(), "", prompt="x", sampler=SamplerParams(top_p=2.0))
    assert rc == 1 and err == "cpuinfer: --top-p must be in (0, 1], got 2.0\n"


def test_banner_reports_the_kv_cache_per_token():
    rc, out, err = chat(FakeModel(), "")
    assert rc == 0 and "KV cache 1.0 KiB/token (0 MiB)" in err
