"""Prepare your own text as a data set bdiff trains on:

    python -m bdiff.data prepare INPUT --tokenizer T --out DIR

INPUT: a folder of text files (every file under it, one document each), a glob ("src/**/*.py"), a .txt file (one
document, or several with --doc_sep), a .jsonl file (one document a line, its --text_field), or a Hugging Face
dataset name (user/name, streamed through `datasets`: pip install datasets). T: bytes, a tiktoken encoding (gpt2,
cl100k_base, ...), a local tokenizer.json or a Hugging Face tokenizer name (bdiff/data/tokenizer.py).

Every document is BOS followed by its tokens. Validation is held out by whole documents, deterministically (the first
document and every k-th after it for --val_fraction, so any input of two documents or more has both splits; the
first documents for --val_tokens). Tokenizing runs on every core (a process
pool over batches of documents, results in order), with a progress bar; the shards are written as they fill
(version 2: uint16, or uint32 when the tokenizer has more than 65,536 ids), with DIR/bdiff.json, the data set's
record. Work happens in DIR.partial/ and is renamed to DIR at the end: a stopped run, started again with the
same command, keeps the shards already written and continues after them; the same input always gives the same
bytes.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

import numpy as np

from bdiff.data.chat import Renderer, has_chat_template, is_conversations, read_conversations, split_to_fit
from bdiff.data.formats import MANIFEST, DataError, DataSet, answers_path, write_answers, write_shard
from bdiff.data.tokenizer import load_tokenizer

STATE = "prepare_state.json"  # in DIR.partial/: where a stopped run continues
BATCH_BYTES = 1 << 20  # text per task of the process pool: large enough to amortise the hand-off


def _documents(source: str, text_field: str, doc_sep: str | None):
    """(iterator over the documents' texts, total bytes or None when unknown, a fingerprint of the input)."""
    if os.path.isdir(source) or any(c in source for c in "*?["):
        if os.path.isdir(source):
            paths = [os.path.join(d, f) for d, dirs, files in os.walk(source) for f in files
                     if not f.startswith(".") and not any(p.startswith(".") for p in os.path.relpath(d, source)
                                                          .split(os.sep) if p != ".")]
        else:
            paths = [p for p in glob.glob(source, recursive=True) if os.path.isfile(p)]
        paths.sort()
        if not paths:
            raise DataError(f"{source}: no files to read (an empty folder, or a glob that matches nothing)")
        return _read_files(paths), sum(os.path.getsize(p) for p in paths), _fingerprint(paths)
    if os.path.isfile(source):
        size = os.path.getsize(source)
        if size == 0:
            raise DataError(f"{source}: empty file")
        if source.endswith(".jsonl"):
            return _read_jsonl(source, text_field), size, _fingerprint([source])
        return _read_text(source, doc_sep), size, _fingerprint([source])
    if source.count("/") == 1 and not os.path.exists(source.split("/")[0]):
        return _read_hub(source, text_field), None, source
    raise DataError(f"{source}: no such file or folder (nor a Hugging Face dataset name user/name)")


def _fingerprint(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(f"{os.path.abspath(p)}:{os.path.getsize(p)}:{int(os.path.getmtime(p))}\n".encode())
    return digest.hexdigest()[:16]


def _decode(raw: bytes, path: str) -> str:
    if b"\0" in raw[:65536]:
        raise DataError(f"{path}: not a text file (it holds NUL bytes); choose text files with a glob, e.g. "
                        "'DIR/**/*.txt'")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); choose text files with a glob") from None


def _read_files(paths):
    for p in paths:
        with open(p, "rb") as f:
            yield _decode(f.read(), p), os.path.getsize(p)


def _read_text(path, doc_sep):
    with open(path, "rb") as f:
        text = _decode(f.read(), path)
    docs = text.split(doc_sep) if doc_sep else [text]
    for doc in docs:
        yield doc, len(doc.encode("utf-8")) + (len(doc_sep.encode()) if doc_sep else 0)


def _read_jsonl(path, text_field):
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)[text_field]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{path}:{n}: not a JSON object with a {text_field!r} field (--text_field)") from None
            yield str(doc), len(line)


def _read_hub(name, text_field):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: reading a Hugging Face dataset needs `pip install datasets` (or pip install -e "
                        "\".[data]\")") from None
    try:
        stream = datasets.load_dataset(name, split="train", streaming=True)
        for row in stream:
            doc = str(row[text_field])
            yield doc, len(doc.encode("utf-8"))
    except KeyError:
        raise DataError(f"{name}: its rows have no {text_field!r} field (--text_field)") from None
    except Exception as e:  # noqa: BLE001 (no network, unknown name: one line)
        raise DataError(f"{name}: could not stream it from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:120] if str(e).strip() else ''})") from None


# --- tokenizing in worker processes ----------------------------------------------------------------------

_worker = {}


def _init_worker(spec: str, dtype) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _worker.update(tokenizer=load_tokenizer(spec), dtype=dtype)


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    """Each document as BOS + its ids, in the shards' dtype (half the bytes of int64 to hand back)."""
    tok, dtype = _worker["tokenizer"], _worker["dtype"]
    bos = np.array([tok.bos_id], dtype=dtype)
    return [np.concatenate([bos, ids.astype(dtype)]) for ids in tok.encode_arrays(texts)]


def _batches(docs, skip: int):
    """Batches of about BATCH_BYTES of text, after skipping the first `skip` documents (done in a run before)."""
    batch, size = [], 0
    for i, (text, nbytes) in enumerate(docs):
        if i < skip:
            continue
        batch.append((text, nbytes))
        size += nbytes
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# --- the run ----------------------------------------------------------------------------------------------

class _Split:
    """One split's shards: tokens buffered until a shard is full, then written."""

    def __init__(self, name: str, split: str, directory: str, shard_tokens: int, token_bytes: int, state: dict):
        self.prefix = os.path.join(directory, f"{name}_{split}_")
        self.shard_tokens, self.token_bytes = shard_tokens, token_bytes
        self.shards, self.tokens = state.get("shards", 0), state.get("tokens", 0)
        self.documents = state.get("documents", 0)
        pending = state.get("pending")
        self.buffer = [np.load(os.path.join(directory, pending))] if pending else []
        self.buffered = sum(len(b) for b in self.buffer)

    def add(self, doc: np.ndarray) -> bool:
        """Add a document; returns whether a shard was written."""
        self.buffer.append(doc)
        self.buffered += len(doc)
        self.tokens += len(doc)
        self.documents += 1
        wrote = False
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.buffer)
            self._write(flat[:self.shard_tokens])
            self.buffer, self.buffered = [flat[self.shard_tokens:]], len(flat) - self.shard_tokens
            wrote = True
        return wrote

    def _write(self, tokens):
        write_shard(f"{self.prefix}{self.shards:06d}.bin", tokens, self.token_bytes)
        self.shards += 1

    def finish(self):
        if self.buffered:
            self._write(np.concatenate(self.buffer))
            self.buffer, self.buffered = [], 0

    def state(self, directory: str, split: str) -> dict:
        pending = None
        if self.buffered:
            pending = f"pending_{split}.npy"
            tmp = os.path.join(directory, f".{pending}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.concatenate(self.buffer))
            os.replace(tmp, os.path.join(directory, pending))
        return dict(shards=self.shards, tokens=self.tokens, documents=self.documents, pending=pending)


def _read_json(path: str) -> dict:
    """A JSON file's object, or {} where it is missing or unreadable (a run stopped before writing it)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def prepare(source: str, tokenizer: str, out: str, name: str | None = None, val_fraction: float | None = 0.01,
            val_tokens: int | None = None, text_field: str = "text", doc_sep: str | None = None,
            shard_tokens: int = 100_000_000, jobs: int | None = None, log=print, progress: bool = True,
            seq_len: int = 2048, block_size: int = 16, align_answers: bool = True) -> DataSet:
    """Tokenize `source` into shards under `out` (see the module docstring); returns the data set's record. A JSONL
    file of conversations goes to `prepare_conversations` (`seq_len`, `block_size`, `align_answers`)."""
    if is_conversations(source):
        if val_tokens is not None:
            raise DataError("--val_tokens: conversations are held out whole, by --val_fraction")
        return prepare_conversations(source, tokenizer, out, name, val_fraction or 0.01, seq_len, block_size,
                                     align_answers, log)
    out = os.path.normpath(out)
    name = name or os.path.basename(os.path.abspath(out))
    if not name.replace("_", "").replace("-", "").isalnum():
        raise DataError(f"--name {name!r}: letters, digits, '-' and '_' only (it names the shard files)")
    if val_tokens is None and not (val_fraction and 0 < val_fraction < 1):
        raise DataError(f"--val_fraction must lie in (0, 1), got {val_fraction}")
    if val_tokens is not None and val_tokens < 1:
        raise DataError(f"--val_tokens must be >= 1, got {val_tokens}")
    if shard_tokens < 1:
        raise DataError(f"--shard_tokens must be >= 1, got {shard_tokens}")
    tok = load_tokenizer(tokenizer)
    token_bytes = 2 if tok.num_ids <= 2**16 else 4
    settings = dict(source=os.path.abspath(source) if os.path.exists(source) else source, tokenizer=tokenizer,
                    name=name, val_fraction=None if val_tokens is not None else val_fraction, val_tokens=val_tokens,
                    text_field=text_field, doc_sep=doc_sep, shard_tokens=shard_tokens)
    docs, total_bytes, settings["fingerprint"] = _documents(source, text_field, doc_sep)
    if os.path.exists(out):
        manifest = _read_json(os.path.join(out, MANIFEST))
        if manifest.get("settings") == settings:
            log(f"{out}: already prepared from the same input and settings")
            log(f"train on it: python train.py --data_dir {out}")
            return DataSet(**manifest["dataset"])
        raise DataError(f"--out {out}: exists and holds other data; choose a new directory (or remove it)")
    work = out + ".partial"
    state = {}
    if os.path.isdir(work):
        state = _read_json(os.path.join(work, STATE))
        if state.get("settings") != settings:
            raise DataError(f"{work}: a stopped prepare of other input or settings; remove it to start over")
        log(f"resuming {work}: {state['documents']:,} documents done, "
            f"{state['train']['shards'] + state['val']['shards']} shard(s) kept")
    else:
        os.makedirs(work)
    splits = {s: _Split(name, s, work, shard_tokens, token_bytes, state.get(s, {})) for s in ("train", "val")}
    done_docs, done_bytes = state.get("documents", 0), state.get("bytes", 0)
    # bytes need no pool: encoding is a copy, cheaper than handing the text to another process and back
    jobs = 1 if tokenizer == "bytes" else jobs or os.cpu_count() or 1
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc=f"prepare {name}",
                   file=sys.stderr, mininterval=0.5, smoothing=0.1, leave=False,
                   disable=None)  # None: shown on a terminal, not in logs (the closing line says it all)
    started = time.perf_counter()
    new_bytes = 0

    def save_state():
        tmp = os.path.join(work, f".{STATE}.tmp")
        with open(tmp, "w") as f:
            json.dump(dict(settings=settings, documents=done_docs, bytes=done_bytes,
                           **{s: splits[s].state(work, s) for s in splits}), f)
        os.replace(tmp, os.path.join(work, STATE))

    def val_next(i: int) -> bool:  # deterministic: whole documents, in input order
        if val_tokens is not None:
            return splits["val"].tokens < val_tokens
        # documents 0, 1/f, 2/f, ...: the first is always held out, so two documents or more make both splits
        return math.ceil((i + 1) * val_fraction) > math.ceil(i * val_fraction)

    dtype = np.uint32 if token_bytes == 4 else np.uint16
    pool = ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(tokenizer, dtype)) if jobs > 1 else None
    if pool is None:
        _init_worker(tokenizer, dtype)

    def encoded():  # (documents' ids, their sizes) in input order, at most 2 batches per process in flight
        window = deque()
        for batch in _batches(docs, done_docs):
            texts = [t for t, _ in batch]
            window.append((pool.submit(_encode_batch, texts) if pool else _encode_batch(texts), [n for _, n in batch]))
            if len(window) > 2 * jobs:
                ids, sizes = window.popleft()
                yield (ids.result() if pool else ids), sizes
        while window:
            ids, sizes = window.popleft()
            yield (ids.result() if pool else ids), sizes

    try:
        for batch, sizes in encoded():
            for ids, n in zip(batch, sizes):
                wrote = splits["val" if val_next(done_docs) else "train"].add(ids)
                done_docs, done_bytes, new_bytes = done_docs + 1, done_bytes + n, new_bytes + n
                if wrote:
                    save_state()  # a shard was written: a stopped run continues after this document
            if bar is not None:
                bar.update(sum(sizes))
                bar.set_postfix(docs=f"{done_docs:,}", tokens=f"{splits['train'].tokens + splits['val'].tokens:,}",
                                refresh=False)
    except BaseException:
        if not os.path.exists(os.path.join(work, STATE)):  # no shard written yet: nothing worth resuming
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    if splits["val"].documents == 0 or splits["train"].documents == 0:
        shutil.rmtree(work, ignore_errors=True)
        raise DataError(f"{source}: {done_docs} document(s): too few to hold out a validation split of whole documents "
                        "and keep a training split (a smaller --val_tokens, more documents, or "
                        "--doc_sep to split one file into documents)")
    for split in splits.values():
        split.finish()
    tokenizer_field = tokenizer
    if os.path.isfile(tokenizer):  # the data set carries its tokenizer: DIR stays usable wherever it goes
        shutil.copyfile(tokenizer, os.path.join(work, "tokenizer.json"))
        tokenizer_field = "tokenizer.json"
    elif os.path.isdir(tokenizer):  # a model's directory (--init's): named where it is, from anywhere
        tokenizer_field = os.path.abspath(tokenizer)
    mask_id = tok.num_ids if tok.mask_id is None else tok.mask_id  # the tokenizer's own, else a new id after it
    record = DataSet(name=name, tokenizer=tokenizer_field, num_ids=tok.num_ids, bos_id=tok.bos_id,
                     mask_id=mask_id, default_dir=out, description=f"{source}, prepared with the {tokenizer} "
                     "tokenizer", prompt="", source=source if not os.path.exists(source) else "")
    seconds = time.perf_counter() - started
    manifest = dict(dataset=asdict(record), settings=settings, token_bytes=token_bytes, shard_version=2,
                    **{s: dict(documents=splits[s].documents, tokens=splits[s].tokens, shards=splits[s].shards)
                       for s in splits})
    for leftover in [f for f in os.listdir(work) if f == STATE or f.startswith("pending_")]:
        os.remove(os.path.join(work, leftover))
    with open(os.path.join(work, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(work, out)
    rate = new_bytes / max(seconds, 1e-9) / 1e6
    log(f"{out}: {splits['train'].documents:,} + {splits['val'].documents:,} documents, {splits['train'].tokens:,} "
        f"train + {splits['val'].tokens:,} validation tokens in {splits['train'].shards} + {splits['val'].shards} "
        f"shard(s) ({'uint32' if token_bytes == 4 else 'uint16'}); {new_bytes / 1e6:.1f} MB in {seconds:.1f} s "
        f"({rate:.1f} MB/s, {jobs} process(es))")
    log(f"train on it: python train.py --data_dir {out}")
    return record


def prepare_conversations(source: str, tokenizer: str, out: str, name: str | None, val_fraction: float,
                          seq_len: int, block_size: int = 16, align_answers: bool = True, log=print) -> DataSet:
    """A JSONL file of conversations (bdiff/data/chat.py) as a data set: every line checked first (a bad one is one
    error naming the line; nothing is written), each conversation rendered (the tokenizer's chat template, else
    the plain one) with its answers' flags (each answer padded to the end of its block of `block_size`, and with
    `align_answers` started at a block boundary), closed by the separator, split at turn boundaries or truncated where
    longer than `seq_len` (the counts said), and packed whole into windows of `seq_len` tokens padded with the
    separator, the answers files beside the shards. Validation: whole conversations (the first and every
    1/val_fraction-th). Returns the record."""
    out = os.path.normpath(out)
    name = name or os.path.basename(os.path.abspath(out))
    if os.path.exists(out):
        raise DataError(f"--out {out}: exists; choose a new directory (or remove it)")
    if block_size < 1 or seq_len < 4 * block_size:
        raise DataError(f"need --block_size >= 1 and --seq_len >= 4 x --block_size, got {block_size}, {seq_len}")
    conversations = read_conversations(source)
    tok = load_tokenizer(tokenizer)
    kind = "template" if has_chat_template(tokenizer) else "plain"
    probe = Renderer(tokenizer, kind, block_size)
    end = tok.encode(probe.end_of_turn)
    if end == [tok.bos_id]:
        raise DataError(f"{tokenizer}: the end of a turn ({probe.end_of_turn}) is the tokenizer's document separator")
    pad_id = pad_token(tok, end)
    renderer = Renderer(tokenizer, kind, block_size, align_answers, pad_id)
    splits = {"train": ([], []), "val": ([], [])}
    changed = {"split": 0, "truncated": 0}
    for i, messages in enumerate(conversations):
        pieces, what = split_to_fit(messages, renderer.encode, seq_len)
        if what:
            changed[what] += 1
        held = math.ceil((i + 1) * val_fraction) > math.ceil(i * val_fraction)  # as prepare holds documents out
        for ids, flags in pieces:
            splits["val" if held else "train"][0].append(ids + [tok.bos_id])
            splits["val" if held else "train"][1].append(flags + [False])
    if changed["split"] or changed["truncated"]:
        log(f"{changed['split'] + changed['truncated']:,} conversation(s) longer than --seq_len {seq_len} tokens: "
            f"{changed['split']:,} split at turn boundaries, {changed['truncated']:,} truncated")
    if not splits["train"][0] or not splits["val"][0]:
        raise DataError(f"{source}: {len(conversations)} conversation(s): too few to hold out whole conversations for "
                        "validation and keep some for training")
    work = out + ".partial"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    token_bytes = 2 if tok.num_ids <= 2**16 else 4
    counts = {}
    for split, (docs, flags) in splits.items():
        tokens, answers = _pack(docs, flags, seq_len, tok.bos_id)
        path = os.path.join(work, f"{name}_{split}_000000.bin")
        write_shard(path, tokens, token_bytes)
        write_answers(answers_path(path), answers)
        counts[split] = dict(documents=len(docs), tokens=len(tokens), answers=int(answers.sum()),
                             windows=len(tokens) // seq_len)
    record = DataSet(name=name, tokenizer=os.path.abspath(tokenizer) if os.path.isdir(tokenizer) else tokenizer,
                     num_ids=tok.num_ids, bos_id=tok.bos_id,
                     mask_id=tok.num_ids if tok.mask_id is None else tok.mask_id, default_dir=out,
                     description=f"{source}: conversations, prepared with the {tokenizer} tokenizer", prompt="",
                     chat=kind, end_of_turn=renderer.end_of_turn, packed=seq_len, block_size=block_size,
                     align_answers=align_answers, pad_id=pad_id)
    if os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(work, "tokenizer.json"))
        record = DataSet(**dict(asdict(record), tokenizer="tokenizer.json"))
    with open(os.path.join(work, MANIFEST), "w") as f:
        json.dump(dict(dataset=asdict(record), settings=dict(source=os.path.abspath(source), tokenizer=tokenizer,
                                                             seq_len=seq_len, block_size=block_size,
                                                             align_answers=align_answers),
                       token_bytes=token_bytes, shard_version=2, **counts), f, indent=2)
    os.replace(work, out)
    log(f"{out}: {counts['train']['documents']:,} + {counts['val']['documents']:,} conversations ({kind} template, "
        f"end of turn {renderer.end_of_turn!r}) in {counts['train']['windows']:,} + {counts['val']['windows']:,} "
        f"windows of {seq_len} tokens; {counts['train']['answers']:,} answer tokens of {counts['train']['tokens']:,} "
        "in training")
    log(f"train on it: python train.py --data_dir {out}")
    return record


def pad_token(tok, end_of_turn: list[int]) -> int:
    """What pads answers to their blocks: the tokenizer's pad token (tokenizer_config.json) where it has one that is
    neither the separator nor MASK, else the end of turn where it is one token (an answer then ends in a run of it),
    else a space."""
    own = getattr(tok, "pad_id", None)
    if own is not None and own not in (tok.bos_id, tok.mask_id):
        return own
    if len(end_of_turn) == 1:
        return end_of_turn[0]
    space = tok.encode(" ")
    if len(space) != 1:
        raise DataError(f"{tok.name}: no single token pads answers (no pad token, a multi-token end of turn and space)")
    return space[0]


def _pack(docs: list[list[int]], flags: list[list[bool]], window: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents packed whole, in order, into windows of `window` tokens (a new window where the next one does not
    fit), each window's rest filled with `pad`: (tokens, answer flags) of the windows end to end."""
    tokens, answers, used = [], [], 0
    for ids, f in zip(docs, flags):
        if used + len(ids) > window:
            tokens.append([pad] * (window - used))
            answers.append([False] * (window - used))
            used = 0
        tokens.append(ids)
        answers.append(f)
        used += len(ids)
    tokens.append([pad] * (-used % window))
    answers.append([False] * (-used % window))
    return np.concatenate([np.asarray(t, dtype=np.int64) for t in tokens]), np.concatenate(
        [np.asarray(a, dtype=bool) for a in answers])


def add_arguments(p) -> None:
    p.add_argument("input", help="a folder of text files, a glob, a .txt or .jsonl file, or a Hub dataset user/name")
    p.add_argument("--tokenizer", required=True, help="bytes, gpt2 (or another tiktoken encoding), a tokenizer.json, "
                                                      "or a transformers model's directory or Hub name (--init's)")
    p.add_argument("--out", required=True, help="the data set's directory (created; must not exist)")
    p.add_argument("--name", help="the data set's name (default: the directory's)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val_fraction", type=float, default=0.01, help="fraction of documents held out (default 0.01)")
    split.add_argument("--val_tokens", type=int, help="hold out the first documents up to this many tokens instead")
    p.add_argument("--text_field", default="text", help="the field of a .jsonl line or Hub row holding the text")
    p.add_argument("--doc_sep", help="split a .txt file into documents at this string")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard (default 100M)")
    p.add_argument("--jobs", type=int, help="tokenizing processes (default: every core)")
    chat = p.add_argument_group("conversations (a .jsonl of \"messages\", or of \"prompt\" and \"response\")")
    chat.add_argument("--seq_len", type=int, default=2048, help="conversations are packed whole into windows of this "
                      "many tokens, the training sequence length (default 2048)")
    chat.add_argument("--block_size", type=int, default=16, help="the block size of the model it trains: answers are "
                      "padded to end at a block boundary (default 16)")
    chat.add_argument("--no_align_answers", dest="align_answers", action="store_false", help="let answers start inside "
                      "a block (by default they start at a block boundary, the prompt before them padded, as Fast-dLLM "
                      "v2 trains: on the test task, 40 of 40 held-out answers right after 250 steps, against 1 and 7 "
                      "unaligned; docs/results.md)")


def run(args) -> int:
    prepare(args.input, args.tokenizer, args.out, args.name, args.val_fraction, args.val_tokens, args.text_field,
            args.doc_sep, args.shard_tokens, args.jobs, seq_len=args.seq_len, block_size=args.block_size,
            align_answers=args.align_answers)
    return 0
