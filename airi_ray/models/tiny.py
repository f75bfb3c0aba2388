"""Build a tiny chat model from the demo knowledge base, locally and reproducibly.

The result is an ordinary Hugging Face model directory (Llama architecture, safetensors,
fast tokenizer with a chat template) that vLLM and transformers load like any other model.
It is small enough to train on two CPU cores in about a minute, and it is trained on the
demo knowledge base (plain text plus question/answer chats derived from it), so its answers
are recognisably about that corpus instead of random tokens. It is not meant to be good.

Building is deterministic (fixed seeds, fixed thread count, deterministic kernels, a fixed
step count) and cached: the output directory carries a stamp with a hash of the corpus, the
build configuration and ``BUILDER_VERSION``, and a directory with a matching stamp is reused.

Usage: ``python -m airi_ray.models.tiny [--out DIR] [--force]``; the last stdout line is the
model directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from airi_ray.demo.kb import load_documents
from airi_ray.env import cache_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Bump when the build procedure changes in a way the config does not capture.
BUILDER_VERSION = "1"

STAMP_FILE = "airi-build-stamp.json"

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# Role-tagged format: <|bos|><|user|>\n...<|end|>\n<|assistant|>\n...<|end|>
# Every turn ends with EOS, so generation stops once the assistant turn is complete.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Turn a document title into a user question; "{t}" is the title in running text.
TITLE_QUESTIONS = (
    "{T}?",
    "Can you tell me about {t}?",
    "What should I know about {t}?",
    "How does {t} work at Nimbus Gear?",
    "I have a question about {t}.",
    "Please explain {t}.",
)

# Questions built from the salient words of the answer passage ("{a}", "{b}"), so the model
# learns to connect words in a question with the passage that contains them.
KEYWORD_QUESTIONS = (
    "How do I {a}?",
    "What about {a} and {b}?",
    "Question about {a}: {b}?",
    "Tell me about {a} {b}.",
    "How does {a} work?",
    "Do you have {a}?",
    "{a} {b}?",
    "What is the {a} policy for {b}?",
)

# Words that keep their capital letter when a title is used mid-sentence.
_PROPER_WORDS = {"Nimbus", "Gear", "Plus", "Trail", "Points", "VAT"}

# Words too common to say what a passage is about.
_STOPWORD_TEXT = """
about after also always and any are around because been before being both but can cannot
does each every first for from have here if into its just many may more most must need next
not only other our ours out over own same should some such than that the their them then
there these they this those through under until usually very want was were what when where
which while who will with within without would you your yours
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the built model (besides the corpus and BUILDER_VERSION)."""

    # 2048 is where byte-level BPE on this corpus saturates (about 3.9 bytes per token; the
    # trainer runs out of merges seen twice at ~2190).
    vocab_size: int = 2048
    hidden_size: int = 256
    num_heads: int = 4  # head_dim 64: vLLM's CPU attention rejects small head sizes
    # Two layers: in a fixed CPU budget, more optimizer steps beat depth (four layers with
    # fewer steps answered off-topic far more often).
    num_layers: int = 2
    intermediate_size: int = 688
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    seq_len: int = 256
    # Small batches, many steps: about 60 s of training on two cores.
    batch_size: int = 4
    steps: int = 840
    learning_rate: float = 1.5e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    chats_per_doc: int = 16
    seed: int = 20251128
    threads: int = 2
    log_every: int = 120


def default_model_dir() -> Path:
    """Where the tiny model lives unless a caller says otherwise."""
    return cache_dir() / "models" / "tiny-support"


def build_fingerprint(docs: Sequence[tuple[str, str]], config: BuildConfig) -> str:
    """Hash of everything the build depends on: corpus, config and builder version."""
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\n".encode())
    h.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for doc_id, text in docs:
        # Length-prefix each part so that moving text between documents changes the hash.
        for part in (doc_id, text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def ensure_tiny_model(out: Path | None = None, force: bool = False) -> Path:
    """Return the tiny model directory, building it first unless an up-to-date one exists."""
    out = Path(out).expanduser().resolve() if out is not None else default_model_dir()
    config = BuildConfig()
    docs = load_documents()
    fingerprint = build_fingerprint(docs, config)

    if not force and _stamp_matches(out, fingerprint):
        log.info("tiny model up to date at %s", out)
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    # Serialise concurrent builders (parallel test workers); the loser sees a fresh stamp.
    with _file_lock(out.parent / f".{out.name}.lock"):
        if not force and _stamp_matches(out, fingerprint):
            log.info("tiny model built concurrently at %s", out)
            return out
        _remove_leftovers(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
        try:
            _build(tmp, docs, config)
            _write_stamp(tmp, fingerprint, config)
            _make_readable(tmp)
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("tiny model ready at %s", out)
    return out


# --- caching helpers ---------------------------------------------------------------------


def _stamp_matches(model_dir: Path, fingerprint: str) -> bool:
    try:
        stamp = json.loads((model_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("fingerprint") == fingerprint


def _write_stamp(model_dir: Path, fingerprint: str, config: BuildConfig) -> None:
    stamp = {
        "fingerprint": fingerprint,
        "builder_version": BUILDER_VERSION,
        "config": dataclasses.asdict(config),
    }
    (model_dir / STAMP_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Delete temp dirs of builds that died; call with the lock held (no build is running)."""
    for pattern in (f".{target.name}.build-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _make_readable(model_dir: Path) -> None:
    """Give the build the usual umask permissions (mkdtemp and some writers use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    model_dir.chmod(0o777 & ~umask)
    for path in model_dir.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an old ``target`` is moved aside first, then deleted."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / target.name)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- corpus -> training samples ------------------------------------------------------------


def _split_doc(text: str) -> tuple[str, list[str]]:
    """Title and answer-sized units: prose sentences, and lists kept whole with their lead-in."""
    lines = text.strip().splitlines()
    title = lines[0].lstrip("#").strip()
    units: list[str] = []
    for para in re.split(r"\n\s*\n", "\n".join(lines[1:]).strip()):
        para = para.strip()
        if not para:
            continue
        if "\n- " in para or para.startswith("- "):
            units.append(para)  # a list only makes sense as a whole
        else:
            units.extend(s for s in re.split(r"(?<=[.!?])\s+", para) if s)
    return title, units


def _title_in_text(title: str) -> str:
    title = re.sub(r"^About\s+", "", title)
    words = [w if w in _PROPER_WORDS or w.isupper() else w.lower() for w in title.split()]
    return " ".join(words)


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z'-]{2,}", text.lower()) if w not in _STOPWORDS]


def _keywords(
    text: str, doc_freq: Counter[str], n_docs: int, top: int = 4, min_count: int = 1
) -> list[str]:
    """The text's most distinctive words by tf-idf against the document collection."""
    # min_count > 1 keeps one-off words out of a whole document's keywords: a word used
    # once says little about what the document is about.
    tf = Counter(_words(text))
    candidates = [w for w in tf if tf[w] >= min_count] or list(tf)
    return sorted(candidates, key=lambda w: (-tf[w] * math.log(n_docs / doc_freq[w]), w))[:top]


def _join_units(units: Sequence[str]) -> str:
    """Sentences join with a space; a list starts and ends on its own line."""
    text = units[0]
    for prev, unit in zip(units, units[1:], strict=False):
        text += ("\n" if "\n" in prev or "\n" in unit else " ") + unit
    return text


def make_chats(docs: Sequence[tuple[str, str]], config: BuildConfig) -> list[list[dict[str, str]]]:
    """Question/answer chats per document, all derived from the document itself.

    Three kinds, in turn: a question made from the title, or from the document's most
    distinctive words, answered with the document's opening; and a question made from the
    words of a random passage, answered with that passage. The first two teach the model
    which document a question is about (the raw-text samples teach it to continue the
    document from there); the third makes every fact reachable from some question.
    """
    rng = random.Random(config.seed)
    doc_freq: Counter[str] = Counter()
    for _, text in docs:
        doc_freq.update(set(_words(text)))
    chats: list[list[dict[str, str]]] = []
    for _doc_id, text in docs:
        title, units = _split_doc(text)
        if not units:
            continue
        t = _title_in_text(title)
        doc_keywords = _keywords(text, doc_freq, len(docs), top=8, min_count=2)
        for i in range(config.chats_per_doc):
            kind = i % 4
            start = rng.randrange(len(units)) if kind == 3 else 0
            answer = _join_units(units[start : start + rng.randint(2, 3)])
            if kind in (0, 1):
                question = rng.choice(TITLE_QUESTIONS).format(T=title, t=t)
            else:
                # Passage questions use the opening sentence's words: they pick the start.
                pool = doc_keywords if kind == 2 else _keywords(units[start], doc_freq, len(docs))
                a, b = rng.sample(pool, 2) if len(pool) > 1 else (pool * 2 or ["this", "this"])
                question = rng.choice(KEYWORD_QUESTIONS).format(a=a, b=b)
            chats.append(
                [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            )
    return chats


# --- build steps ---------------------------------------------------------------------------


def _build(out: Path, docs: Sequence[tuple[str, str]], config: BuildConfig) -> None:
    """Train tokenizer and model and write the complete model directory into ``out``."""
    import torch

    # Process-wide torch settings; restore them so a caller's process is left as found.
    prev_threads = torch.get_num_threads()
    prev_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    try:
        started = time.monotonic()
        _train_tokenizer(out, docs, config)
        log.info("tokenizer trained in %.1fs", time.monotonic() - started)
        _train_model(out, docs, config)
        log.info("build finished in %.1fs", time.monotonic() - started)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_deterministic)


def _train_tokenizer(out: Path, docs: Sequence[tuple[str, str]], config: BuildConfig) -> None:
    """Byte-level BPE on the corpus, saved as a transformers fast tokenizer with a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((text for _, text in docs), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": list(ROLE_TOKENS),
        # BOS comes from the chat template (and the training samples); nothing is added
        # implicitly, so a rendered chat is never given a second BOS.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special_map: dict[str, object] = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    special_map["additional_special_tokens"] = list(ROLE_TOKENS)
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def _training_samples(
    out: Path, docs: Sequence[tuple[str, str]], config: BuildConfig
) -> list[tuple[list[int], int]]:
    """Every training sample as (token ids, number of leading tokens excluded from the loss)."""
    from transformers import AutoTokenizer

    # Render chats with the saved tokenizer, exactly as a server will render prompts.
    tok = AutoTokenizer.from_pretrained(out)
    samples: list[tuple[list[int], int]] = []
    for _, text in docs:
        ids = tok.encode(BOS + text.strip() + EOS, add_special_tokens=False)
        # Non-overlapping windows; each window after the first is plain continuation text.
        step = config.seq_len
        samples.extend((ids[i : i + step], 0) for i in range(0, len(ids), step))
    for chat in make_chats(docs, config):
        prompt = tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(chat, tokenize=False)
        # Drop the newline after the final EOS: generation stops at EOS, nothing follows it.
        ids = tok.encode(full.rstrip("\n"), add_special_tokens=False)
        # Learn the answers only; the questions are templates, not worth model capacity.
        n_prompt = len(tok.encode(prompt, add_special_tokens=False))
        samples.append((ids[: config.seq_len], n_prompt))
    return samples


def _batches(
    samples: list[tuple[list[int], int]], config: BuildConfig, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless (input_ids, attention_mask, labels) batches, seeded, length-bucketed."""
    import torch

    rng = random.Random(config.seed + 1)
    bs = config.batch_size
    while True:
        order = list(range(len(samples)))
        rng.shuffle(order)
        # Sort within windows of 8 batches so a batch holds similar lengths (less padding)
        # while batches still mix documents and chats.
        window = bs * 8
        for w in range(0, len(order) - bs + 1, window):
            chunk = sorted(order[w : w + window], key=lambda i: len(samples[i][0]))
            groups = [chunk[i : i + bs] for i in range(0, len(chunk) - bs + 1, bs)]
            rng.shuffle(groups)
            for group in groups:
                width = max(len(samples[i][0]) for i in group)
                ids = torch.full((bs, width), pad_id, dtype=torch.long)
                mask = torch.zeros((bs, width), dtype=torch.long)
                labels = torch.full((bs, width), -100, dtype=torch.long)
                for row, i in enumerate(group):
                    seq, n_prompt = samples[i]
                    ids[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                    labels[row, n_prompt : len(seq)] = ids[row, n_prompt : len(seq)]
                yield ids, mask, labels


def _train_model(out: Path, docs: Sequence[tuple[str, str]], config: BuildConfig) -> None:
    """Initialise a small Llama deterministically, train it for a fixed step count, save it."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(out)
    samples = _training_samples(out, docs, config)
    n_tokens = sum(len(ids) for ids, _ in samples)
    log.info("training data: %d samples, %d tokens", len(samples), n_tokens)

    model_config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config)
    model.train()
    log.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)

    # No weight decay on norms (1-D weights), as usual for transformers.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
        foreach=False,  # one kernel path, whatever the parameter layout
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))

    batches = _batches(samples, config, tok.pad_token_id)
    started = time.monotonic()
    running = 0.0
    for step in range(1, config.steps + 1):
        ids, mask, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running += loss.item()
        if step % config.log_every == 0 or step == config.steps:
            n = step % config.log_every or config.log_every
            log.info(
                "step %d/%d loss %.3f lr %.2e (%.1fs)",
                step,
                config.steps,
                running / n,
                schedule.get_last_lr()[0],
                time.monotonic() - started,
            )
            running = 0.0

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)


def _lr_factor(step: int, config: BuildConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak rate."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- command line --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: build (or reuse) the model and print its directory last."""
    parser = argparse.ArgumentParser(
        prog="python -m airi_ray.models.tiny", description=(__doc__ or "").strip().split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=None, help="model directory to create")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    path = ensure_tiny_model(args.out, force=args.force)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
