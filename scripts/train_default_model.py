"""Train the bundled default model (pied/models/default) from text every Python install carries.

The model is a tiny Llama (4 layers, hidden 256, GQA 4/2 heads, 1024 positions, tied embeddings,
~4.2M parameters, bf16 on disk) with a 4096-token byte-level BPE tokenizer. Its training text is
Python's own documentation, so nothing is downloaded: the language reference topics of
``pydoc_data.topics`` (what ``help("lists")`` shows) and the docstrings of builtins and a fixed list
of standard-library modules. Most of it is rendered as ChatML conversations ("Tell me about X" ->
"X: " and a paragraph of X's documentation, "Tell me more." -> the next one), the same text the
folder's chat template produces, so that a chat request gets an answer that ends with
``<|im_end|>``; the rest is plain text between ``<s>`` and ``</s>``. Only prose paragraphs are kept
(no grammar productions or code), since the point is English-like replies about Python, not a code
model.

Training: 700 AdamW steps of 4 packed rows of 512 tokens (about 1.4M tokens, seven passes over
the ~200k-token corpus), cosine schedule, bf16 autocast. Rows are 512 tokens, so positions past 512
of the 1024 the config allows are untrained: long conversations get worse before they get cut.

Reproducible on a given Python version (its docs are the data): a fixed seed, a deterministic data
order and one CPU thread (AMX bf16 matmuls make one thread faster than two shared ones). About
6-10 minutes on one core of a recent x86 CPU (Sapphire Rapids); final loss 2.90 on Python 3.11.7.
Needs the test extra (transformers)::

    .venv/bin/python scripts/train_default_model.py

It prints the loss as it goes, the final loss, and a few greedy replies. Expect a tiny model's
replies: English-like sentences about Python that wander; greedy decoding tends to loop, so chat
with a temperature (``pied chat`` uses 0.7).
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import inspect
import json
import math
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers
    import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from tiny_models import BOS, CHAT_TEMPLATE, EOS, IM_END, SPECIAL_TOKENS  # noqa: E402

VOCAB_SIZE = 4096
MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)

# Modules whose docstrings join the corpus: importable everywhere, no import-time side effects.
DOCSTRING_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "atexit", "base64", "binascii", "bisect", "bz2",
    "calendar", "cmath", "code", "codecs", "collections", "collections.abc", "colorsys",
    "concurrent.futures", "configparser", "contextlib", "contextvars", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "doctest", "email", "email.message", "enum", "errno",
    "filecmp", "fileinput", "fnmatch", "fractions", "functools", "gc", "getopt", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http", "http.client",
    "http.server", "importlib", "inspect", "io", "ipaddress", "itertools", "json", "keyword",
    "linecache", "locale", "logging", "lzma", "math", "mimetypes", "mmap", "multiprocessing",
    "numbers", "operator", "optparse", "os", "os.path", "pathlib", "pdb", "pickle", "pkgutil",
    "platform", "pprint", "profile", "pstats", "queue", "random", "re", "reprlib", "sched", "secrets",
    "select", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver",
    "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess", "symtable", "sys",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "tomllib",
    "traceback", "types", "typing", "unicodedata", "unittest", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib", "zoneinfo",
)  # fmt: skip

TOPIC_QUESTIONS = (
    "Tell me about {subject}.",
    "Tell me about {subject}",
    "What are {subject}?",
    "Explain {subject}.",
    "Can you explain {subject}?",
    "How do {subject} work in Python?",
    "Describe {subject}.",
    "What should I know about {subject}?",
    "I have a question about {subject}.",
    "{subject}?",
)
NAME_QUESTIONS = (
    "What does {name} do?",
    "Tell me about {name}.",
    "Explain {name}.",
    "What is {name}?",
    "How do I use {name}?",
    "What is {name} for?",
)
FOLLOW_UPS = ("Tell me more.", "Go on.", "And then?", "What else?", "More, please.", "Continue.")
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant who knows Python well.",
    "Answer questions about Python.",
    "You are pied, a small model that talks about Python.",
)
# Typographic quotes become ASCII so that replies stay plain text in any terminal.
ASCII_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": "--"})
HEADING_RULE = re.compile(r"^([*=\-^~])\1{2,}$")


@dataclass
class Entry:
    """One thing to talk about: how a user names it, and its prose paragraphs in order."""

    subjects: list[str]  # "lists", "list displays", ...
    paragraphs: list[str]
    by_name: bool  # a function or class: asked about with NAME_QUESTIONS


# ------------------------------------------------------------------ corpus


def reflow(block: str) -> str:
    return " ".join(line.strip() for line in block.splitlines()).translate(ASCII_QUOTES).strip()


def is_prose(paragraph: str) -> bool:
    """A sentence-like paragraph: no grammar productions, doctests, tables or signatures."""
    if len(paragraph) < 30 or "::=" in paragraph or ">>>" in paragraph or "->" in paragraph:
        return False
    if paragraph.startswith(("+", "|", "=", "-", "*")):
        return False
    plain = sum(ch.isalpha() or ch in " .,;:'\"()" for ch in paragraph)
    return plain / len(paragraph) >= 0.9 and paragraph[0].isupper()


def prose_paragraphs(text: str) -> list[str]:
    """The unindented prose paragraphs of a documentation text, each on one line."""
    paragraphs: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or lines[0][:1].isspace():  # indented: code, grammar or a quoted table
            continue
        paragraph = reflow(block)
        if is_prose(paragraph):
            paragraphs.append(paragraph)
    return paragraphs


def topic_sections(topic_key: str, text: str) -> list[tuple[str, str]]:
    """(title, body) for each section of a pydoc topic; titles are the underlined headings."""
    lines = text.splitlines()
    heads = [
        i for i in range(len(lines) - 1) if lines[i].strip() and HEADING_RULE.match(lines[i + 1].strip())
    ]
    if not heads:
        return [(topic_key.replace("-", " "), text)]
    sections: list[tuple[str, str]] = []
    for index, head in enumerate(heads):
        end = heads[index + 1] if index + 1 < len(heads) else len(lines)
        sections.append((lines[head].strip(), "\n".join(lines[head + 2 : end])))
    return sections


def topic_entries() -> list[Entry]:
    import pydoc_data.topics

    entries: list[Entry] = []
    for key in sorted(pydoc_data.topics.topics):
        for index, (title, body) in enumerate(topic_sections(key, pydoc_data.topics.topics[key])):
            paragraphs = prose_paragraphs(body)
            if not paragraphs:
                continue
            subject = title.translate(ASCII_QUOTES)
            subjects = [subject[0].lower() + subject[1:]]
            if index == 0 and key.isalpha() and key.lower() != subjects[0].lower():
                subjects.append(key)  # help("lists") names the topic "lists"
            entries.append(Entry(subjects, paragraphs, by_name=False))
    return entries


def documented_objects() -> Iterator[tuple[str, object]]:
    """(qualified name, object) for builtins and the public API of DOCSTRING_MODULES, in a fixed order."""
    for name in sorted(dir(builtins)):
        if not name.startswith("_"):
            yield name, getattr(builtins, name)
    for module_name in DOCSTRING_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # not built into this Python (tomllib before 3.11, ...)
            continue
        yield module_name, module
        names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for name in sorted(names):
            value = getattr(module, name, None)
            if value is None or inspect.ismodule(value):
                continue
            if getattr(value, "__module__", module_name) not in (module_name, module.__name__):
                continue  # re-exported from elsewhere: documented there
            yield f"{module_name}.{name}", value
            if inspect.isclass(value):
                for method in sorted(vars(value)):
                    if not method.startswith("_") and callable(vars(value)[method]):
                        yield f"{module_name}.{name}.{method}", getattr(value, method, None)


def docstring_entries() -> list[Entry]:
    entries: list[Entry] = []
    seen: set[str] = set()
    for name, value in documented_objects():
        doc = inspect.getdoc(value) if value is not None else None
        if not doc or doc in seen:
            continue
        seen.add(doc)
        paragraphs = prose_paragraphs(doc)
        if paragraphs:
            kind = "module" if inspect.ismodule(value) else "class" if inspect.isclass(value) else "function"
            subjects = [name, f"the {name} {kind}"]
            entries.append(Entry(subjects, paragraphs[:6], by_name=True))
    return entries


# ------------------------------------------------------------------ documents


def chat_turn(role: str, content: str) -> str:
    """One message as CHAT_TEMPLATE renders it (checked against the template in check_template)."""
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def answer_chunks(paragraphs: list[str], max_words: int = 90) -> list[str]:
    """Paragraphs grouped into replies of about max_words words, so replies end soon enough for
    the model to learn where <|im_end|> goes."""
    chunks: list[str] = []
    current: list[str] = []
    for paragraph in paragraphs:
        words = sum(len(p.split()) for p in current)
        if current and words + len(paragraph.split()) > max_words:
            chunks.append("\n\n".join(current))
            current = []
        current.append(paragraph)
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def display_name(entry: Entry, subject: str) -> str:
    """How a reply or a page names its subject: a Python name as written, a topic capitalised."""
    return entry.subjects[0] if entry.by_name else subject[0].upper() + subject[1:]


def lead_in(entry: Entry, subject: str, answer: str) -> str:
    """The answer, opening with what it is about ("Lists: A list display is ...") unless it already
    does. A model this small answers mostly from its first words: copying the subject from the
    question is the cheapest way to keep the reply on it."""
    name = display_name(entry, subject)
    return answer if answer.lower().startswith(name.lower()) else f"{name}: {answer}"


def conversation(entry: Entry, rng: random.Random) -> str:
    subject = rng.choice(entry.subjects)
    questions = NAME_QUESTIONS if entry.by_name else TOPIC_QUESTIONS
    text = chat_turn("system", rng.choice(SYSTEM_PROMPTS)) if rng.random() < 0.25 else ""
    text += chat_turn("user", rng.choice(questions).format(subject=subject, name=subject))
    chunks = answer_chunks(entry.paragraphs)
    text += chat_turn("assistant", lead_in(entry, subject, chunks[0]))
    for chunk in chunks[1 : 1 + rng.randint(0, 2)]:
        text += chat_turn("user", rng.choice(FOLLOW_UPS)) + chat_turn("assistant", chunk)
    return text


def plain_document(entry: Entry) -> str:
    """A section as a page: its name as a heading, then its paragraphs."""
    heading = display_name(entry, entry.subjects[0])
    return "<s>" + heading + "\n\n" + "\n\n".join(entry.paragraphs) + "</s>"


def epoch_documents(entries: list[Entry], rng: random.Random) -> list[str]:
    """One pass over every entry: mostly as a conversation, a quarter as plain text; shuffled."""
    documents = [plain_document(e) if rng.random() < 0.25 else conversation(e, rng) for e in entries]
    rng.shuffle(documents)
    return documents


# ------------------------------------------------------------------ tokenizer and model


def train_tokenizer(entries: list[Entry]) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [p for e in entries for p in [*e.subjects, *e.paragraphs]]
    lines += [q for q in TOPIC_QUESTIONS + NAME_QUESTIONS + FOLLOW_UPS + SYSTEM_PROMPTS]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    assert [tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<|im_end|>")] == [BOS, EOS, IM_END]
    return tokenizer


def token_stream(entries: list[Entry], tokenizer: tokenizers.Tokenizer, seed: int) -> Iterator[int]:
    """Token ids of epoch after epoch of documents (each epoch phrased and ordered anew)."""
    rng = random.Random(seed)
    while True:
        for document in epoch_documents(entries, rng):
            yield from tokenizer.encode(document).ids


def batches(stream: Iterator[int], batch_size: int, seq_len: int) -> Iterator[list[list[int]]]:
    """Packed rows of seq_len tokens; documents run across row boundaries (no padding)."""
    while True:
        yield [[next(stream) for _ in range(seq_len)] for _ in range(batch_size)]


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    args: argparse.Namespace, entries: list[Entry], tokenizer: tokenizers.Tokenizer
) -> transformers.LlamaForCausalLM:
    import torch
    import transformers

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=True,  # a quarter of the parameters otherwise, for little gain at this size
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        **MODEL_SHAPE,
    )
    model = transformers.LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)

    data = batches(token_stream(entries, tokenizer, args.seed), args.batch_size, args.seq_len)
    losses: list[float] = []
    start = time.monotonic()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        input_ids = torch.tensor(next(data))
        # bf16 autocast runs the matmuls on AMX/AVX512-BF16 where there is one; weights stay fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == args.steps:
            elapsed = time.monotonic() - start
            tokens = (step + 1) * args.batch_size * args.seq_len
            recent = sum(losses[-25:]) / len(losses[-25:])
            print(
                f"step {step + 1}/{args.steps}  loss {recent:.3f}  {tokens / elapsed:.0f} tok/s  {elapsed:.0f}s",
                flush=True,
            )
    final = sum(losses[-50:]) / len(losses[-50:])
    print(f"final loss (mean of the last 50 steps): {final:.3f}  wall time {time.monotonic() - start:.0f}s")
    return model


# ------------------------------------------------------------------ output


def save(model: transformers.LlamaForCausalLM, tokenizer: tokenizers.Tokenizer, out: Path) -> None:
    import torch

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out)
    # save_pretrained writes through a private temporary file; the package ships it world-readable.
    (out / "model.safetensors").chmod(0o644)
    # Both ends: </s> after plain text, <|im_end|> after a chat reply.
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS, "eos_token_id": [EOS, IM_END]}, indent=2) + "\n"
    )
    (out / "tokenizer.json").write_text(tokenizer.to_str())
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": MODEL_SHAPE["max_position_embeddings"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def check_template(out: Path) -> None:
    """The folder's chat template must render conversations exactly as the training text did."""
    from pied.tokenizer import Tokenizer

    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    rendered = Tokenizer.from_folder(out).apply_chat_template(messages, add_generation_prompt=True)
    expected = "".join(chat_turn(m["role"], m["content"]) for m in messages) + "<|im_start|>assistant\n"
    assert rendered == expected, (rendered, expected)


def show_samples(out: Path) -> None:
    import torch
    import transformers

    from pied.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(out)
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for question in ("Tell me about lists", "What does len do?", "Explain the for statement."):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}])
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            output = model.generate(ids, max_new_tokens=60, do_sample=False, eos_token_id=[EOS, IM_END])
        print(f"> {question}\n{tokenizer.decode(output[0, ids.shape[1] :].tolist())}\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "pied" / "models" / "default")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    entries = topic_entries() + docstring_entries()
    tokenizer = train_tokenizer(entries)
    num_words = sum(len(p.split()) for e in entries for p in e.paragraphs)
    print(
        f"corpus: {len(entries)} entries, {num_words} words; vocabulary {tokenizer.get_vocab_size()}",
        flush=True,
    )
    model = train(args, entries, tokenizer)
    save(model, tokenizer, args.out)
    check_template(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")
    show_samples(args.out)


if __name__ == "__main__":
    main()
