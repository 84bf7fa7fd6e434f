"""Conversations: as data (`python -m bdiff.data prepare chat.jsonl --tokenizer T --out DIR`) and as prompts
(`python -m bdiff.chat`, `sample.py --chat`). One renderer serves both, so a model is asked exactly as it was taught.

A conversations file is JSONL, one conversation a line, recognised without a flag:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}              (optionally "system": "...")

Roles are system, user and assistant. Rendering uses the tokenizer's chat template where it has one (transformers'
apply_chat_template: `pip install transformers`); otherwise bdiff's plain template:

    System: {content}\\n               (where there is a system message)
    User: {content}\\n
    Assistant: {content}<|end|>\\n

An answer is an assistant's content and the end of its turn ("<|end|>", or the template's own end-of-turn token,
such as Qwen's <|im_end|>), padded to the end of its last block: those tokens are noised and carry loss; everything
else (system, user, the template's headers) is prompt, always clean. The padding matters: a block the sampler
denoises is masked to its end, so in training too the answer's last block holds nothing the model could read the
answer's length from (the prompt after it starts in a block of its own). Sampling stops at the end of the turn. With
`align_answers` every answer also starts at a block boundary (the prompt before it padded, clean), as Fast-dLLM v2
trains.
"""
from __future__ import annotations

import json
import os

from bdiff.data.formats import DataError

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"  # the plain template's end of an answer
PLAIN = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}  # each message's header


class ChatError(DataError):
    """A conversations file or template that cannot be used; the message names the file and line."""


def is_conversations(path: str) -> bool:
    """Whether `path` is a JSONL file of conversations: its first non-empty line is an object with "messages", or
    with "prompt" and "response"."""
    if not (path.endswith(".jsonl") and os.path.isfile(path)):
        return False
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except ValueError:
                    return False
                return isinstance(first, dict) and ("messages" in first or {"prompt", "response"} <= set(first))
    return False


def read_conversations(path: str) -> list[list[dict]]:
    """Every conversation of the file as a list of {"role", "content"}, all lines checked before any is used: a
    line that is not JSON, lacks the fields, names an unknown role or holds no answer is one error naming the file
    and the line."""
    conversations = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(raw)
            except ValueError as e:
                raise ChatError(f"{where}: not JSON ({e.args[0].split(':')[0]})") from None
            conversations.append(_messages(row, where))
    if not conversations:
        raise ChatError(f"{path}: no conversations")
    return conversations


def _messages(row, where: str) -> list[dict]:
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ChatError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}}")
    elif isinstance(row, dict) and {"prompt", "response"} <= set(row):
        messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
            {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    else:
        raise ChatError(f"{where}: expected \"messages\" (a list of {{\"role\", \"content\"}}) or \"prompt\" and "
                        "\"response\"")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise ChatError(f"{where}: message {i} must be an object with \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise ChatError(f"{where}: message {i}: unknown role {m['role']!r} (system, user or assistant)")
        if not isinstance(m["content"], str):
            raise ChatError(f"{where}: message {i}: \"content\" must be text")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatError(f"{where}: no assistant message (nothing to learn)")
    return out


def _transformers_source(spec: str) -> str:
    """What transformers' AutoTokenizer reads for a tokenizer spec: a tokenizer.json's directory (a model
    directory holds its tokenizer_config.json beside it), else the spec (a directory or a Hub id)."""
    return os.path.dirname(os.path.abspath(spec)) if os.path.isfile(spec) else spec


def has_chat_template(spec: str) -> bool:
    """Whether the tokenizer `spec` (a directory, a tokenizer.json beside its config, or a Hub id) carries a chat
    template transformers can render."""
    from bdiff.data.tokenizer import TIKTOKEN

    if spec == "bytes" or spec in TIKTOKEN:
        return False
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return False
    try:
        return bool(AutoTokenizer.from_pretrained(_transformers_source(spec)).chat_template)
    except (OSError, ValueError):
        return False


class Renderer:
    """Conversations to token ids, with the flags of the answers' tokens. `kind`: "plain" or "template" (the
    tokenizer's chat template). Each answer is padded with `pad_id` to end at a multiple of `block_size` (positions
    counted from the conversation's start, where its document starts), and with `align_answers` starts at one."""

    def __init__(self, tokenizer: str, kind: str, block_size: int, align_answers: bool = False, pad_id: int = -1):
        from bdiff.data.tokenizer import load_tokenizer

        self.tok, self.kind = load_tokenizer(tokenizer), kind
        self.block_size, self.align_answers, self.pad_id = block_size, align_answers, pad_id
        self.template = None
        if kind == "template":
            from transformers import AutoTokenizer

            self.template = AutoTokenizer.from_pretrained(_transformers_source(tokenizer))
            self.end_of_turn = self._template_end_of_turn()
        else:
            self.end_of_turn = END_OF_TURN

    def _render(self, messages, generation_prompt=False) -> str:
        try:
            return self.template.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=generation_prompt)
        except Exception as e:  # noqa: BLE001 (jinja raises what the template says: one line)
            raise ChatError(f"the tokenizer's chat template refused a conversation ({type(e).__name__}: "
                            f"{str(e)[:160]})") from None

    def _template_end_of_turn(self) -> str:
        """What the template writes after an answer's content, its closing newline stripped: its end of turn."""
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        prefix, whole = self._render(probe[:1], True), self._render(probe)
        end = whole[len(prefix) + 1:].strip() if whole.startswith(prefix + "y") else ""
        if not end:
            raise ChatError("the tokenizer's chat template writes no end of turn after an answer")
        return end

    def encode(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """(ids, answer flags) of a whole conversation."""
        if self.kind == "plain":
            segments = []
            for m in messages:
                segments.append((PLAIN[m["role"]], False))
                if m["role"] == "assistant":
                    segments += [(m["content"] + END_OF_TURN, True), ("\n", False)]
                else:
                    segments.append((m["content"] + "\n", False))
            ids, flags = [], []
            for text, answer in segments:
                if answer:
                    self._pad(ids, flags, self.align_answers, False)
                new = self.tok.encode(text)
                ids += new
                flags += [answer] * len(new)
                if answer:
                    self._pad(ids, flags, True, True)
            return ids, flags
        text = self._render(messages)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix, upto = self._render(messages[:k], True), self._render(messages[:k + 1])
            if not (text.startswith(upto) and upto.startswith(prefix)):
                raise ChatError("the tokenizer's chat template does not render a conversation's turns as prefixes "
                                "of it, so its answers cannot be told apart")
            spans.append((len(prefix), len(upto)))
        encoding = self.tok.tok.encode(text, add_special_tokens=False)
        ids, flags = [], []
        for token, (start, _) in zip(encoding.ids, encoding.offsets):
            answer = any(a <= start < b for a, b in spans)
            if flags and flags[-1] and not answer:  # an answer just ended
                self._pad(ids, flags, True, True)
            if answer and (not flags or not flags[-1]):
                self._pad(ids, flags, self.align_answers, False)
            ids.append(token)
            flags.append(answer)
        if flags and flags[-1]:
            self._pad(ids, flags, True, True)
        return ids, flags

    def prompt(self, messages: list[dict]) -> list[int]:
        """The ids that ask for the next answer: the conversation so far, then the assistant's header (padded as
        answers were in training)."""
        if self.kind == "plain":
            ids, flags = self.encode([m for m in messages])
            ids += self.tok.encode(PLAIN["assistant"])
        else:
            ids = self.tok.tok.encode(self._render(messages, True), add_special_tokens=False).ids
        self._pad(ids, [False] * len(ids), self.align_answers, False)
        return ids

    def _pad(self, ids: list[int], flags: list[bool], on: bool, answer: bool) -> None:
        """Where `on`: pad with pad_id so that the next token starts a block; the pads are answer where `answer`."""
        if on:
            gap = -len(ids) % self.block_size
            ids += [self.pad_id] * gap
            flags += [answer] * gap

    def answer_text(self, ids: list[int]) -> tuple[str, bool]:
        """The text of generated ids up to the end of the turn, and whether the turn ended."""
        text = self.tok.decode(ids)
        at = text.find(self.end_of_turn)
        return (text, False) if at < 0 else (text[:at], True)


def split_to_fit(messages: list[dict], encode, limit: int) -> tuple[list[tuple[list[int], list[bool]]], str]:
    """A conversation as pieces of at most `limit` tokens (its closing separator included): whole, or split at turn
    boundaries (each piece keeps the system message and starts with a user turn), or truncated where one exchange
    alone is longer. Returns the pieces and what was done: "", "split" or "truncated"."""
    ids, flags = encode(messages)
    if len(ids) < limit:
        return [(ids, flags)], ""
    system = [m for m in messages[:1] if m["role"] == "system"]
    exchanges, current = [], []
    for m in messages[len(system):]:
        if m["role"] == "user" and any(x["role"] == "assistant" for x in current):
            exchanges.append(current)
            current = []
        current.append(m)
    exchanges.append(current)
    pieces, what, group = [], "split", []
    for exchange in exchanges:
        trial = encode(system + group + exchange)
        if len(trial[0]) < limit:
            group += exchange
            continue
        if group:
            pieces.append(encode(system + group))
        group = exchange
        if len(encode(system + group)[0]) >= limit:
            i, f = encode(system + group)
            pieces.append((i[:limit - 1], f[:limit - 1]))
            what, group = "truncated", []
    if group:
        pieces.append(encode(system + group))
    return [p for p in pieces if any(p[1])], what
