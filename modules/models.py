"""Base model and tokenizer loading, the LoRA factory, adapter loading and device choice (SPEC §4).

``--base_model_name`` accepts a Hugging Face hub id, a local model directory, or one of
the two built-in names of :mod:`modules.builtin_models` (``tiny-random-llama``,
``smollm2-135m``), which work without a model hub: they are built once into a local cache
and loaded from there like any local model folder.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from modules.builtin_models import BUILTIN_MODELS, SMOL_NAME, TINY_NAME, builtin_dir, ensure_builtin, ensure_pad_token

logger = logging.getLogger(__name__)

# Seconds to wait for the hub before declaring it unreachable (the default retries of
# the hub client can take minutes on a firewalled machine).
_HUB_PROBE_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------- device


def _gpu_index(device_id: int | str) -> int | torch.device:
    """A ``--device_id`` as a GPU index, or the non-CUDA torch device it names (``cpu``, ``mps``)."""
    text = str(device_id).strip().lower()
    if text.lstrip("-").isdigit():
        return int(text) if int(text) >= 0 else torch.device("cpu")  # negative: the original's "no GPU"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device_id {device_id}: not a GPU index (0, 1, ...), cuda:N or cpu") from None
    if device.type != "cuda":
        return device
    return device.index or 0


def _no_gpu(device_id: int | str, reason: str) -> ValueError:
    return ValueError(f"--device_id {device_id}: {reason}; use --device_id cpu to run on the CPU")


def _why_no_cuda() -> str:
    if not torch.backends.cuda.is_built():
        return f"this torch ({torch.__version__}) is built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "CUDA finds no GPU" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")


def resolve_device(device_id: int | str | None = None) -> torch.device:
    """Map ``--device_id`` to a torch device.

    ``None``: the first GPU when there is one, else the CPU. ``cpu`` (or a negative number): the
    CPU. ``N`` or ``cuda:N``: the N-th GPU among the visible ones (torch numbers the GPUs that
    ``CUDA_VISIBLE_DEVICES`` leaves, in its order). A GPU that was asked for and is not there is a
    ValueError, never a silent CPU run: an 8B model would crawl on the CPU for hours.
    """
    if device_id is None:
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        # debug, not info: a run that fails next should print its error line alone
        logger.debug("CUDA is not available; using the CPU")
        return torch.device("cpu")
    index = _gpu_index(device_id)
    if isinstance(index, torch.device):
        return index
    if not torch.cuda.is_available():
        raise _no_gpu(device_id, _why_no_cuda())
    count = torch.cuda.device_count()
    if index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        raise _no_gpu(device_id, f"only {count} GPU(s) are visible (indices 0-{count - 1}{where})")
    return torch.device("cuda", index)


def isolate_gpu(device_id: int | str | None) -> torch.device:
    """:func:`resolve_device` for a process that must see that one GPU only, such as a run of the
    HF Trainer: it trains on ``cuda:0`` and spreads over every visible GPU with DataParallel.

    ``CUDA_VISIBLE_DEVICES`` is narrowed to the requested GPU (its N-th entry when set, else GPU
    N), which then is ``cuda:0``. CUDA reads the variable once, when it starts, so this must run
    before anything touches CUDA; later, the device is resolved without narrowing.
    """
    index = None if device_id is None else _gpu_index(device_id)
    if not isinstance(index, int) or torch.cuda.is_initialized():
        return resolve_device(device_id)
    if not torch.backends.cuda.is_built():
        raise _no_gpu(device_id, _why_no_cuda())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if index >= len(entries):
            raise _no_gpu(device_id, f"CUDA_VISIBLE_DEVICES={visible!r} makes {len(entries)} GPU(s) visible"
                                     + (f" (indices 0-{len(entries) - 1})" if entries else ""))
        chosen = entries[index]
    else:
        chosen = str(index)
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        if visible is None:  # as it was, for any process started from here
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
        where = f"entry {index} of CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else f"GPU {index}"
        raise _no_gpu(device_id, f"CUDA finds no GPU at {where} (nvidia-smi lists the GPUs)")
    logger.info("--device_id %s: GPU %s (CUDA_VISIBLE_DEVICES=%s, cuda:0 in this process)", device_id, chosen, chosen)
    return torch.device("cuda", 0)


def check_4bit(device: torch.device) -> None:
    """Raise a one-line ValueError unless 4-bit QLoRA can run: a CUDA device and bitsandbytes
    (an optional GPU extra, not in requirements.txt)."""
    if torch.device(device).type != "cuda":
        raise ValueError("--load_in_4bit needs a CUDA GPU (bitsandbytes QLoRA); drop the flag on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--load_in_4bit needs bitsandbytes, which is not installed: pip install bitsandbytes")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (half the memory, fp32 range); float32 elsewhere.

    CPU stays float32: bf16 matmuls on CPU are slow and the losses are tested in fp32.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# --------------------------------------------------------------------------- resolution


def _fail_unreachable(name: str, reason: str) -> OSError:
    first = reason.strip().splitlines()[0] if reason.strip() else "unknown error"
    return OSError(
        f"Cannot load model '{name}': not a local directory, not in the local Hugging Face cache, "
        f"and the hub is unreachable or refused it ({first}). "
        f"Use a local model directory or a built-in: {TINY_NAME}, {SMOL_NAME}"
    )


def _load_pretrained(loader: Callable[..., object], name: str, **kwargs: object) -> object:
    """Call ``loader.from_pretrained`` so that an unreachable hub fails in seconds.

    Order: built-in cache / local folder; the local HF cache (``local_files_only``, no
    network); a short probe of the hub; only then a normal (downloading) load.
    """
    if name in BUILTIN_MODELS:
        return loader(str(ensure_builtin(name)), **kwargs)
    if Path(name).expanduser().is_dir():
        return loader(str(Path(name).expanduser()), **kwargs)
    try:
        return loader(name, local_files_only=True, **kwargs)
    except (OSError, ValueError) as cached_error:
        cached_reason = str(cached_error)
    from huggingface_hub import HfApi
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise _fail_unreachable(name, f"HF_HUB_OFFLINE is set; {cached_reason}") from None
    try:
        HfApi().model_info(name, timeout=_HUB_PROBE_TIMEOUT_S)
    except Exception as probe_error:  # network, validation, missing or private repo: all one message
        raise _fail_unreachable(name, f"{type(probe_error).__name__}: {probe_error}") from None
    return loader(name, **kwargs)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a hub id, local folder or built-in, with a pad token set."""
    tokenizer = _load_pretrained(AutoTokenizer.from_pretrained, name)
    ensure_pad_token(tokenizer)
    if name in BUILTIN_MODELS:
        tokenizer.name_or_path = name
    return tokenizer


def load_base_model(
    name: str,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    load_in_4bit: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer on ``device`` (default: first GPU, else CPU).

    ``dtype`` defaults to :func:`default_dtype`. Built-ins report their built-in name as
    ``name_or_path`` so PEFT writes that name, not a cache path, into adapter_config.json.
    ``load_in_4bit`` (QLoRA, CUDA + bitsandbytes only) quantises the frozen base weights.
    """
    device = resolve_device(None) if device is None else torch.device(device)
    dtype = default_dtype(device) if dtype is None else dtype
    tokenizer = load_tokenizer(name)
    kwargs: dict[str, object] = {"dtype": dtype}
    if device.type == "cuda":
        # Load straight onto the GPU instead of staging the whole model in host memory.
        kwargs["device_map"] = {"": device}
    if load_in_4bit:
        check_4bit(device)
        from transformers import BitsAndBytesConfig

        # The original tool's QLoRA: NF4 with double quantisation, computing in bf16.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = _load_pretrained(AutoModelForCausalLM.from_pretrained, name, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    if name in BUILTIN_MODELS:
        model.name_or_path = name
        model.config.name_or_path = name
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    # KV cache on for generation; the trainer turns it off when gradient checkpointing.
    model.config.use_cache = True
    logger.info("Loaded %s on %s (%s, %.1fM parameters)", name, device, dtype, model.num_parameters() / 1e6)
    return model, tokenizer


# --------------------------------------------------------------------------- LoRA


def add_lora(
    model: PreTrainedModel,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    top_layers: int = 0,
) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters; only the LoRA matrices are trainable.

    Defaults are the original tool's (r=16, alpha=32, dropout=0.05 on q/v projections, every
    layer). ``top_layers=N`` adapts only the last N decoder layers: nothing below them needs a
    gradient, so autograd records no graph there and the backward pass stops at layer L-N.
    """
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        # Gradient checkpointing stays the trainer's decision (TrainingArguments).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        layers_to_transform=_top_layer_indices(model, top_layers),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _peft_wrapping():
        return _saves_adapter_only(get_peft_model(model, config))


@contextlib.contextmanager
def _peft_wrapping() -> Iterator[None]:
    """Around PEFT wrapping a base model (``get_peft_model``, ``PeftModel.from_pretrained``).

    PEFT 0.21's ``PeftModel`` reads ``model.is_gradient_checkpointing``, which transformers 5
    renamed ``is_activation_checkpointing`` and warns about on every read: a FutureWarning about
    PEFT's own code that no user can act on, so it is ignored here, and only here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _saves_adapter_only(adapter: PeftModel) -> PeftModel:
    """``adapter`` with every ``save_pretrained`` (the Trainer's checkpoints too) told that the base
    embeddings are not part of it.

    PEFT's default (``save_embedding_layers="auto"``) decides whether the vocabulary was resized
    by loading the base model's config from ``base_model_name_or_path``, which for a built-in is
    its name (``smollm2-135m``: neither a folder nor a hub id), and warns "Could not find a config
    file". Here the vocabulary is never resized (:func:`ensure_pad_token` only reuses existing
    tokens) and the base embeddings stay frozen, so the answer is known: no.
    """
    adapter.save_pretrained = functools.partial(adapter.save_pretrained, save_embedding_layers=False)
    return adapter


def _top_layer_indices(model: PreTrainedModel, top_layers: int) -> list[int] | None:
    """Indices of the last ``top_layers`` decoder layers (None = all layers)."""
    n_layers = model.config.num_hidden_layers
    if top_layers < 0 or top_layers > n_layers:
        raise ValueError(f"the model has {n_layers} decoder layers; top_layers must be in 0..{n_layers}")
    return list(range(n_layers - top_layers, n_layers)) if top_layers else None


def _canonical_base_name(name: str) -> str:
    """Normalise a base model reference for comparison: built-in names (also their cache
    folders) map to the built-in name, existing folders to their absolute path."""
    if name in BUILTIN_MODELS:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        for builtin in BUILTIN_MODELS:
            if resolved == builtin_dir(builtin).resolve():
                return builtin
        return str(resolved)
    return name.rstrip("/")


def _adapter_base_name(adapter_dir: Path) -> str | None:
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise ValueError(f"{config_path}: malformed JSON ({error})") from None
    return config.get("base_model_name_or_path")


def load_adapter(
    base_name: str,
    adapter_dir: str | Path,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    is_trainable: bool = False,
    check_base: bool = True,
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Load ``base_name`` (see :func:`load_base_model`) and apply the adapter in ``adapter_dir``.

    Refuses, before loading any weights, an adapter trained on a different base model:
    LoRA deltas on the wrong base load without error but produce garbage.
    ``check_base=False`` skips the check (e.g. the base folder was moved).
    """
    adapter_dir = Path(adapter_dir).expanduser()
    recorded = _adapter_base_name(adapter_dir)
    if check_base and recorded and _canonical_base_name(recorded) != _canonical_base_name(base_name):
        raise ValueError(
            f"{adapter_dir}: adapter was trained on base model '{recorded}', not '{base_name}'; "
            f"pass --base_model_name {recorded}"
        )
    if recorded is None:
        logger.warning("%s records no base model; cannot check it matches '%s'", adapter_dir, base_name)
    model, tokenizer = load_base_model(base_name, device=device, dtype=dtype)
    with _peft_wrapping():
        peft_model = _saves_adapter_only(PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable))
    if not is_trainable:
        peft_model.eval()
    return peft_model, tokenizer
