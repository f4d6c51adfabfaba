"""``cpuinfer run``: an interactive terminal chat in the manner of ``ollama run``.

Each turn renders the whole conversation with the model's chat template, tokenizes it and
evaluates only what the session's KV cache does not already hold (the longest common prefix of
the cached tokens and the new prompt is kept), then streams the sampled reply.

DeepSeek-R1-style reasoning (``<think>…</think>``, possibly opened by the template itself) is
shown apart from the answer — a "Thinking..." header, dim text, "...done thinking." — or hidden;
only the answer is kept in the conversation. Ctrl-C stops a reply (what was said so far is kept);
at the prompt it only reminds how to leave. ``/?`` lists the commands.

With :attr:`ChatOptions.prompt` set it answers once, pipe-friendly: no colors and no stats
unless stdout is a terminal.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import TextIO

from .chat_template import render_chat
from .errors import CpuinferError
from .model import reusable_prefix
from .sampling import Sampler, SamplerParams
from .tokenizer import StreamDecoder, encode_prompt

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_HEADER, THINK_FOOTER = "Thinking...", "...done thinking."
PROMPT, CONTINUATION = ">>> ", "... "
MULTILINE = '"""'
EXIT_HINT = "Use /bye or Ctrl-D to exit."

HELP = """Available commands:
  /set temp <float>        sampling temperature (0 = greedy)
  /set top_k <int>         keep the k most likely tokens (0 = off)
  /set top_p <float>       nucleus sampling mass, in (0, 1]
  /set min_p <float>       drop tokens below min_p x the top probability, in [0, 1)
  /set repeat_penalty <f>  penalty for recently seen tokens (1 = off)
  /set seed <int|random>   random seed
  /set max_tokens <int>    longest reply in tokens (0 = until the context is full)
  /set system <text>       system prompt (empty text removes it; the conversation stays)
  /set think on|off        show or hide the model's thinking
  /set stats on|off        timing line after each reply
  /show                    current settings and context use
  /clear                   forget the conversation and empty the KV cache
  /bye                     exit (also Ctrl-D)
  /?, /help                this help
Use \"\"\" to begin and end a multi-line message. Ctrl-C stops a reply."""


@dataclass
class ChatOptions:
    """What ``cpuinfer run`` was asked for.

    ``prompt``: answer this once and return (one-shot mode); None starts the interactive chat.
    ``max_tokens``: longest reply (None or 0: until a stop token or a full context).
    ``color`` / ``stats``: None decides by whether the stream is a terminal (``NO_COLOR`` and
    ``TERM=dumb`` turn colors off); stats are always on in the interactive chat by default.
    """
    prompt: str | None = None
    sampler: SamplerParams = field(default_factory=SamplerParams)
    max_tokens: int | None = None
    system: str | None = None
    hide_think: bool = False
    color: bool | None = None
    stats: bool | None = None


# ----------------------------------------------------------------------------------------------
# Styling

class _Style:
    """ANSI styling that becomes the identity when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and text else text

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    @property
    def dim_on(self) -> str:
        return "\x1b[2m" if self.enabled else ""

    @property
    def reset(self) -> str:
        return "\x1b[0m" if self.enabled else ""

    def bold(self, text: str) -> str:
        return self._wrap("1", text)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _colors_allowed(stream, wanted: bool | None) -> bool:
    if wanted is not None:
        return wanted
    return (_isatty(stream) and "NO_COLOR" not in os.environ
            and os.environ.get("TERM", "") != "dumb")


# ----------------------------------------------------------------------------------------------
# Reply streaming

class ThinkSplitter:
    """Splits a streamed reply into ``("think", text)`` and ``("answer", text)`` segments.

    A reply thinks when it opens with ``<think>`` (after whitespace) or when the prompt already
    opened it (``in_think``); the thinking ends at ``</think>``. Tags may arrive split across any
    number of pieces: a tail that could still become a tag is held until it is decided.
    A ``<think>`` later in the answer is ordinary text.
    """
    START, THINK, ANSWER = "start", "think", "answer"

    def __init__(self, in_think: bool = False):
        self.state = self.THINK if in_think else self.START
        self.thought = in_think          # a think section happened (even an empty one)
        self._held = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        s = self._held + text
        self._held = ""
        while s:
            if self.state == self.START:
                body = s.lstrip()
                if body.startswith(THINK_OPEN):
                    self.state, self.thought = self.THINK, True
                    s = body[len(THINK_OPEN):]
                elif THINK_OPEN.startswith(body):    # still undecided ("", "<", "<thi", ...)
                    self._held = s
                    s = ""
                else:
                    self.state = self.ANSWER
            elif self.state == self.THINK:
                i = s.find(THINK_CLOSE)
                if i >= 0:
                    if i:
                        out.append(("think", s[:i]))
                    self.state = self.ANSWER
                    s = s[i + len(THINK_CLOSE):]
                else:
                    keep = _partial_tag_suffix(s, THINK_CLOSE)
                    if len(s) > keep:
                        out.append(("think", s[:len(s) - keep]))
                    self._held = s[len(s) - keep:]
                    s = ""
            else:
                out.append(("answer", s))
                s = ""
        return out

    def flush(self) -> list[tuple[str, str]]:
        held, self._held = self._held, ""
        if not held:
            return []
        return [("think" if self.state == self.THINK else "answer", held)]


def _partial_tag_suffix(s: str, tag: str) -> int:
    """Length of the longest suffix of ``s`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(s)), 0, -1):
        if tag.startswith(s[-n:]):
            return n
    return 0


class _ReplyView:
    """Writes one streamed reply to ``out`` and collects its answer text.

    Thinking is shown between :data:`THINK_HEADER` and :data:`THINK_FOOTER` (dim when styled),
    with its leading and trailing whitespace trimmed, or dropped with ``hide_think``. After a
    think section the answer's leading whitespace is dropped too.
    """

    def __init__(self, out: TextIO, style: _Style, hide_think: bool, in_think: bool):
        self.out, self.style, self.hide = out, style, hide_think
        self.split = ThinkSplitter(in_think)
        self.answer: list[str] = []
        self._header = self._footer = False
        self._think_ws = ""              # whitespace held back inside the thinking
        self._think_text = False         # non-whitespace thinking was written
        self._at_line_start = True

    def _write(self, text: str, styled: str | None = None) -> None:
        if text:
            self.out.write(text if styled is None else styled)
            self.out.flush()
            self._at_line_start = text.endswith("\n")

    def feed(self, text: str) -> None:
        for kind, seg in self.split.feed(text):
            self._segment(kind, seg)

    def finish(self) -> str:
        """End the reply (closing an unfinished thought); return the answer text."""
        for kind, seg in self.split.flush():
            self._segment(kind, seg)
        if self.split.state == ThinkSplitter.THINK or self.split.thought:
            self._close_think()
        if not self._at_line_start:
            self._write("\n")
        return "".join(self.answer)

    def _segment(self, kind: str, seg: str) -> None:
        if kind == "think":
            if self.hide:
                return
            if not self._header:            # dim stays on until the footer
                self._header = True
                self._write(THINK_HEADER + "\n", self.style.dim_on + THINK_HEADER + "\n")
            text = self._think_ws + seg
            if not self._think_text:
                text = text.lstrip()
            body = text.rstrip()
            self._think_ws = text[len(body):]
            if body:
                self._think_text = True
                self._write(body)
            return
        if self.split.thought:
            self._close_think()
            if not self.answer:
                seg = seg.lstrip()
                if not seg:
                    return
        self.answer.append(seg)
        self._write(seg)

    def _close_think(self) -> None:
        if self._footer or not self._header:
            return
        self._footer = True
        if not self._at_line_start:
            self._write("\n")
        self._write(THINK_FOOTER + "\n\n", THINK_FOOTER + self.style.reset + "\n\n")


# ----------------------------------------------------------------------------------------------
# The chat

class _ContextFull(Exception):
    pass


class _Chat:
    def __init__(self, model, opts: ChatOptions, stdin: TextIO, stdout: TextIO, stderr: TextIO):
        self.model, self.opts = model, opts
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.tok = model.tokenizer
        self.session = model.new_session()
        self.n_ctx = int(model.n_ctx)
        self.messages: list[dict] = []
        self.system = opts.system or None
        self.hide_think = opts.hide_think
        self.max_tokens = opts.max_tokens or 0
        self.params = replace(opts.sampler).validate()
        self.sampler = Sampler(self.params, model.n_vocab)
        self.out_style = _Style(_colors_allowed(stdout, opts.color))
        self.err_style = _Style(_colors_allowed(stderr, opts.color))
        interactive = opts.prompt is None
        self.one_shot = not interactive
        self.show_stats = opts.stats if opts.stats is not None else (
            interactive or _isatty(stdout))
        self.bos_text = self._special_text(self.tok.bos_id)
        self.eos_text = self._special_text(getattr(self.tok, "eos_id", None))

    # -- helpers --------------------------------------------------------------------------------
    def _special_text(self, tid) -> str:
        return self.tok.token_text(tid) if tid is not None else ""

    def note(self, text: str) -> None:
        """A one-line message for the user (stderr, so stdout carries only replies)."""
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def _prompt_ids(self, messages: list[dict]) -> tuple[list[int], bool]:
        """Token ids of the rendered conversation, and whether the template opened a thought."""
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        text = render_chat(self.model.chat_template, full, add_generation_prompt=True,
                           bos_token=self.bos_text, eos_token=self.eos_text)
        return encode_prompt(self.tok, text), text.rstrip().endswith(THINK_OPEN)

    def context_full_message(self) -> str:
        return f"context full ({self.n_ctx} tokens): /clear to start over"

    # -- one reply ------------------------------------------------------------------------------
    def reply(self, user_text: str) -> bool:
        """Answer ``user_text`` given the conversation so far; False if nothing was answered.

        The user's message and the (possibly partial) answer join the conversation when at
        least one token was generated; a full context or an error leaves it unchanged.
        """
        messages = self.messages + [{"role": "user", "content": user_text}]
        ids, in_think = self._prompt_ids(messages)
        if len(ids) >= self.n_ctx:
            if self.one_shot:
                raise CpuinferError(f"the prompt is {len(ids)} tokens, the context holds {self.n_ctx}: "
                                    f"use a larger --ctx or a shorter prompt")
            self.note(self.context_full_message())
            return False
        s = self.session
        keep = reusable_prefix(s.tokens, ids)
        s.truncate(keep)
        t0 = time.perf_counter()
        try:
            logits = s.eval(ids[keep:])
        except KeyboardInterrupt:
            self.note("\n(interrupted)")
            return False
        t_prompt = time.perf_counter() - t0
        n_prompt = len(ids) - keep

        view = _ReplyView(self.stdout, self.out_style, self.hide_think, in_think)
        dec = StreamDecoder(self.tok)
        stop = self.tok.stop_ids
        n_gen, full = 0, False
        t1 = time.perf_counter()
        try:
            while not self.max_tokens or n_gen < self.max_tokens:
                t = self.sampler.sample(logits, s.tokens)
                if t in stop:
                    break
                n_gen += 1
                view.feed(dec.add(t))
                if len(s.tokens) >= self.n_ctx:
                    full = True
                    break
                logits = s.eval([t])
        except KeyboardInterrupt:
            pass
        t_gen = time.perf_counter() - t1
        view.feed(dec.flush())
        answer = view.finish()
        if full:
            self.note(self.context_full_message())
        if self.show_stats:
            self.note(self.err_style.dim(
                f"prompt: {n_prompt} tokens, {_rate(n_prompt, t_prompt)} | "
                f"reply: {n_gen} tokens, {_rate(n_gen, t_gen)}"))
        self.messages = messages + [{"role": "assistant", "content": answer}]
        return True

    # -- commands -------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; False means leave the chat."""
        words = line.split(None, 2)
        cmd = words[0].lower()
        if cmd in ("/bye", "/exit", "/quit"):
            return False
        if cmd in ("/?", "/help"):
            self.note(HELP)
        elif cmd == "/clear":
            self.messages = []
            self.session.reset()
            self.note("Cleared session context")
        elif cmd == "/show":
            self.show()
        elif cmd == "/set":
            self.set(words[1].lower() if len(words) > 1 else "", words[2] if len(words) > 2 else "")
        else:
            self.note(f"Unknown command '{words[0]}'. Type /? for help")
        return True

    _NUMERIC = {"temp": ("temperature", float), "temperature": ("temperature", float),
                "top_k": ("top_k", int), "top_p": ("top_p", float), "min_p": ("min_p", float),
                "repeat_penalty": ("repeat_penalty", float),
                "repeat_last_n": ("repeat_last_n", int), "seed": ("seed", int)}

    def set(self, key: str, value: str) -> None:
        value = value.strip()
        if key == "system":
            self.system = value or None
            self.note("Set system message." if value else "Removed system message.")
        elif key == "think":
            if value.lower() not in ("on", "off"):
                self.note("Usage: /set think on|off")
                return
            self.hide_think = value.lower() == "off"
            self.note(f"Thinking will be {'hidden' if self.hide_think else 'shown'}.")
        elif key in ("stats", "verbose"):
            if value.lower() not in ("on", "off"):
                self.note(f"Usage: /set {key} on|off")
                return
            self.show_stats = value.lower() == "on"
        elif key == "max_tokens":
            try:
                n = int(value)
                if n < 0:
                    raise ValueError
            except ValueError:
                self.note(f"max_tokens must be an integer >= 0 (0 = no limit), got {value!r}")
                return
            self.max_tokens = n
            self.note(f"Set max_tokens to {n}.")
        elif key in self._NUMERIC:
            name, kind = self._NUMERIC[key]
            try:
                v = None if name == "seed" and value.lower() in ("random", "none") else kind(value)
                params = replace(self.params, **{name: v}).validate()
            except ValueError:
                self.note(f"{key} needs {'an integer' if kind is int else 'a number'}, got {value!r}")
                return
            except CpuinferError as e:
                self.note(str(e))
                return
            self.params = params
            self.sampler = Sampler(params, self.model.n_vocab)
            self.note(f"Set {name} to {v}.")
        else:
            self.note("Usage: /set temp|top_k|top_p|min_p|repeat_penalty|repeat_last_n|seed|"
                      "max_tokens <value>, /set system <text>, /set think on|off, "
                      "/set stats on|off")

    def show(self) -> None:
        p = self.params
        used = len(self.session.tokens)
        self.note(
            f"model: {self.model.arch}, context {used}/{self.n_ctx} tokens "
            f"({used * int(self.model.kv_bytes_per_token) / 2**20:.1f} MiB of KV cache in use)\n"
            f"temperature {p.temperature}, top_k {p.top_k}, top_p {p.top_p}, min_p {p.min_p}, "
            f"repeat_penalty {p.repeat_penalty}, repeat_last_n {p.repeat_last_n}, "
            f"seed {p.seed if p.seed is not None else 'random'}, "
            f"max_tokens {self.max_tokens or 'unlimited'}\n"
            f"thinking {'hidden' if self.hide_think else 'shown'}, "
            f"system: {self.system!r}")

    # -- input ----------------------------------------------------------------------------------
    def read_line(self, prompt: str) -> str | None:
        """One line of input without its newline; None at end of input."""
        if self.stdin is sys.stdin and self.stdout is sys.stdout and _isatty(self.stdin):
            try:
                return input(prompt)         # readline editing and history
            except EOFError:
                return None
        self.stdout.write(prompt)
        self.stdout.flush()
        line = self.stdin.readline()
        if not line:
            return None
        return line[:-1] if line.endswith("\n") else line

    def read_message(self) -> str | None:
        """A message: one line, or several between lines of triple quotes."""
        line = self.read_line(PROMPT)
        if line is None or not line.lstrip().startswith(MULTILINE):
            return line
        text = line.lstrip()[len(MULTILINE):]
        parts = []
        while True:
            if text.rstrip().endswith(MULTILINE):
                parts.append(text.rstrip()[:-len(MULTILINE)])
                return "\n".join(parts)
            parts.append(text)
            text = self.read_line(CONTINUATION)
            if text is None:                # EOF inside the block: send what there is
                return "\n".join(parts)

    def loop(self) -> int:
        if _isatty(self.stdin) and self.stdin is sys.stdin:
            try:
                import readline  # noqa: F401  (enables line editing and history for input())
            except ImportError:
                pass
        kv = self.model.kv_bytes_per_token
        self.note(self.err_style.dim(f"cpuinfer chat: {self.model.arch}, context {self.n_ctx} tokens, "
                                     f"KV cache {kv / 1024:.1f} KiB/token ({kv * self.n_ctx / 2**20:.0f} MiB). "
                                     f"/? for help, /bye to exit."))
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                self.stdout.write("\n")
                self.note(EXIT_HINT)
                continue
            if text is None:
                self.stdout.write("\n")
                self.stdout.flush()
                return 0
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text.strip()):
                    return 0
                continue
            try:
                self.reply(text)
            except CpuinferError as e:
                self.note(f"cpuinfer: {e}")
            self.stdout.write("\n")
            self.stdout.flush()


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} tokens/s" if n and seconds > 0 else "- tokens/s"


def run_chat(model, params: ChatOptions, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
             stderr: TextIO = sys.stderr) -> int:
    """Run the chat (or answer ``params.prompt`` once); return the process exit status.

    ``model`` needs ``arch``, ``n_ctx``, ``n_vocab``, ``tokenizer``, ``chat_template``,
    ``kv_bytes_per_token`` and ``new_session()`` (see :mod:`cpuinfer.model`).
    """
    try:
        chat = _Chat(model, params, stdin, stdout, stderr)
    except CpuinferError as e:
        stderr.write(f"cpuinfer: {e}\n")
        return 1
    if params.prompt is None:
        return chat.loop()
    try:
        return 0 if chat.reply(params.prompt) else 1
    except CpuinferError as e:
        stderr.write(f"cpuinfer: {e}\n")
        return 1
