"""The HF → GGUF converter, proven against transformers' own forward pass.

Each supported architecture is built as a tiny random model with a tokenizer trained on the
spot (no network), saved with save_pretrained, converted, and loaded in llama.cpp. llama.cpp's
logits at every position of a fixed token sequence must equal transformers' to within 1e-3 at
f32; the tokenizers must produce the same ids for a sample text.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ggml_probe.errors import OutputExists, ProbeError, UnsupportedArchitecture
from ggml_probe.models import convert
from ggml_probe.models.convert import SUPPORTED_ARCHITECTURES, convert_hf_to_gguf

# ------------------------------------------------------------------ tiny models, built offline

# Pre-tokenizer regexes as published in the Llama 3 and Qwen2 tokenizer.json files.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

# Written to fall where the pre-tokenizers disagree: digit runs (1, 1-3 or any length),
# a letter run led by punctuation, contractions in capitals, punctuation before newlines.
SAMPLE_TEXT = (
    "The quick brown fox doesn't jump over 12345 lazy dogs in 2024!\n\n"
    "(Café) au lait, \"naïve\" résumé: 3.14159... I'LL be there.  Two  spaces\tand a tab."
)

WORDS = (
    "the quick brown fox jumps over lazy dog model weights quantization llama token layer "
    "attention head neuron probe calibration confidence answer question true false café naïve "
    "résumé lait hello world it's don't I'll I'LL DON'T IT'S we're they've she'd"
).split()
NUMBERS = ("2024", "12345", "365", "42", "1000", "3.14159")


def corpus(n_lines: int = 400) -> list[str]:
    """Deterministic text whose frequent pieces span those disagreements, so merges learn them."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_lines):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size=10)]
        words[int(rng.integers(0, 10))] = NUMBERS[i % len(NUMBERS)]
        words[int(rng.integers(0, 10))] = f'("{words[i % 10]}")'
        lines.append(" ".join(words[:5]) + ["!\n\n", ".\n", ",  ", "\t", ": "][i % 5] + " ".join(words[5:]))
    return lines


def byte_level_tokenizer(style: str):
    """A GPT-2-style byte-level BPE with the pre-tokenizer of Llama 3, Qwen2 or SmolLM."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style == "smollm")
    if style == "llama3":
        pre = [pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"), byte_level]
        specials_first, specials_last = [], ["<|begin_of_text|>", "<|end_of_text|>"]
    elif style == "qwen2":
        pre = [pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"), byte_level]
        specials_first, specials_last = [], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:  # SmolLM: single digits, then GPT-2's own regex; specials at the start of the vocab
        pre = [pre_tokenizers.Digits(individual_digits=True), byte_level]
        specials_first, specials_last = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], []

    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640, special_tokens=specials_first, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(specials_last)  # like Llama 3 / Qwen2: ids after the BPE vocab
    if style == "llama3":
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B:1",
            special_tokens=[("<|begin_of_text|>", bos)],
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                       eos_token="<|end_of_text|>")
    if style == "qwen2":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>")


def sentencepiece_tokenizer(folder: Path):
    """A SentencePiece BPE with byte fallback (Llama 2 / Mistral style), tokenizer.model kept."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    return LlamaTokenizer.from_pretrained(folder, add_bos_token=True)


def randomise(model, seed: int) -> None:
    """Weights large enough that attention, rope and norms visibly shape the logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif p.ndim == 1:  # biases
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            elif "lm_head" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.2 * noise)


@dataclass
class TinyModel:
    name: str
    path: Path
    tokenizer: Any  # the transformers tokenizer
    token_ids: list[int]  # the fixed sequence whose logits are compared
    reference_logits: np.ndarray  # transformers, float32, [len(token_ids), vocab]
    expected_pre: str
    expected_tokenizer_model: str


CASES = ("llama3", "smollm", "qwen2", "mistral")


def build(case: str, root: Path) -> TinyModel:
    import torch
    import transformers

    torch.manual_seed(0)
    folder = root / f"tiny-{case}"
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    if case == "mistral":
        tokenizer = sentencepiece_tokenizer(folder)
    else:
        tokenizer = byte_level_tokenizer(case)
    n_tokens = len(tokenizer)
    rope = {"rope_theta": 10000.0, "rope_type": "default"}
    if case == "llama3":
        # Llama 3.1's rope rescaling, with a short original context so that all three of its
        # wavelength bands (kept, blended, divided) occur among 8 frequencies.
        rope = {"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        config = transformers.LlamaConfig(vocab_size=n_tokens, tie_word_embeddings=False,
                                          bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id, **common)
    elif case == "smollm":
        rope = {"rope_theta": 50000.0, "rope_type": "linear", "factor": 2.0}
        config = transformers.LlamaConfig(vocab_size=n_tokens, tie_word_embeddings=True,
                                          bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id, **common)
    elif case == "qwen2":
        rope = {"rope_theta": 1000000.0, "rope_type": "default"}
        # vocab rounded up like Qwen2.5's (151936 rows for 151665 tokens): unnamed rows padded
        config = transformers.Qwen2Config(vocab_size=n_tokens + 21, tie_word_embeddings=True,
                                          eos_token_id=tokenizer.eos_token_id, **common)
    else:  # head_dim 32 ≠ hidden/heads = 16, as in Mistral Nemo
        config = transformers.MistralConfig(vocab_size=n_tokens, head_dim=32, sliding_window=None,
                                            bos_token_id=1, eos_token_id=2, **common)
    set_rope(config, rope)
    model_class = {"llama3": transformers.LlamaForCausalLM, "smollm": transformers.LlamaForCausalLM,
                   "qwen2": transformers.Qwen2ForCausalLM, "mistral": transformers.MistralForCausalLM}[case]
    model = model_class(config).eval()
    randomise(model, seed=CASES.index(case))
    if case == "smollm":
        model = model.to(torch.bfloat16)  # SmolLM2 ships bf16: exercises the bf16 reader

    save_kwargs = {"max_shard_size": "40KB"} if case == "qwen2" else {}  # sharded checkpoint + index
    model.save_pretrained(folder, **save_kwargs)
    tokenizer.save_pretrained(folder)

    # The reference is what a user gets: the saved checkpoint loaded back in float32 (converting
    # the in-memory bf16 model instead would keep its bf16-rounded rope frequencies).
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = [int(i) for i in np.random.default_rng(1).integers(0, n_tokens, size=20)]
    with torch.no_grad():
        logits = reloaded(torch.tensor([ids])).logits[0].numpy()
    pre = {"llama3": "llama-bpe", "smollm": "smollm", "qwen2": "qwen2", "mistral": "default"}[case]
    return TinyModel(folder.name, folder, tokenizer, ids, logits, pre, "llama" if case == "mistral" else "gpt2")


def set_rope(config, rope: dict[str, Any]) -> None:
    """transformers >= 5 keeps rope settings in rope_parameters; 4.x in rope_theta/rope_scaling."""
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = rope
    else:
        config.rope_theta = rope["rope_theta"]
        extra = {k: v for k, v in rope.items() if k != "rope_theta"}
        config.rope_scaling = None if extra["rope_type"] == "default" else extra


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("hf")
    built: dict[str, TinyModel] = {}

    def get(case: str) -> TinyModel:
        if case not in built:
            built[case] = build(case, root)
        return built[case]

    return get


# ------------------------------------------------------------------ llama.cpp side


def llama_logits(path: Path, token_ids: list[int]) -> np.ndarray:
    """Logits at every position, with an f32 KV cache so that f32 weights mean f32 all through."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, verbose=False,
        n_threads=2, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )
    try:
        llm.eval(token_ids)
        return np.array(llm.scores[: len(token_ids)], dtype=np.float32)
    finally:
        llm.close()


def llama_tokenize(path: Path, text: str) -> list[int]:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    finally:
        llm.close()


def gguf_fields(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            continue
        value = field.contents()
        fields[name] = value
    tensor_types = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, tensor_types


def convert_to(model: TinyModel, out_dir: Path, outtype: str) -> Path:
    return convert_hf_to_gguf(model.path, out_dir / f"{model.name}-{outtype}.gguf", outtype=outtype)


# ------------------------------------------------------------------ the proof: logits


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_f32_logits_equal_transformers(tiny, tmp_path, case, record_property):
    model = tiny(case)
    out = convert_to(model, tmp_path, "f32")
    ours = llama_logits(out, model.token_ids)
    ref = model.reference_logits
    n_vocab = model.tokenizer.__len__() if case != "qwen2" else ref.shape[1]
    assert ours.shape == ref.shape == (len(model.token_ids), n_vocab)
    # the comparison means something only if logits are large and vary by position
    assert ref.std() > 1.0
    assert np.abs(ref[1:] - ref[:-1]).max() > 1.0
    diff = float(np.abs(ours - ref).max())
    record_property("max_abs_diff_f32", diff)
    print(f"{case}: f32 max |llama.cpp - transformers| = {diff:.3g} (logit std {ref.std():.2f})")
    assert diff < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_half_precision_logits_close(tiny, tmp_path, case, outtype, record_property):
    model = tiny(case)
    out = convert_to(model, tmp_path, outtype)
    ours = llama_logits(out, model.token_ids)
    ref = model.reference_logits
    diff = float(np.abs(ours - ref).max())
    record_property(f"max_abs_diff_{outtype}", diff)
    print(f"{case}: {outtype} max |llama.cpp - transformers| = {diff:.3g} (max |logit| {np.abs(ref).max():.1f})")
    # f16 keeps 11 significant bits, bf16 8; llama.cpp also rounds activations to the weight type
    tolerance = {"f16": 0.02, "bf16": 0.1}[outtype] * np.abs(ref).max()
    assert diff < tolerance
    assert (ours.argmax(axis=1) == ref.argmax(axis=1)).mean() >= 0.9


@pytest.mark.slow
def test_logit_check_catches_a_missing_rope_reorder(tiny, tmp_path, monkeypatch):
    """The f32 comparison is sharp enough to see HF's rotate-half layout left as it is."""
    model = tiny("llama3")
    monkeypatch.setattr(convert, "_rotary_halves_to_pairs", lambda w, n_heads: w)
    out = convert_to(model, tmp_path, "f32")
    diff = np.abs(llama_logits(out, model.token_ids) - model.reference_logits).max()
    assert diff > 0.1


@pytest.mark.slow
def test_logit_check_catches_missing_llama3_rope_factors(tiny, tmp_path, monkeypatch):
    model = tiny("llama3")
    monkeypatch.setattr(convert, "_llama3_rope_factors", lambda hp: np.ones(hp.head_dim // 2, np.float32))
    out = convert_to(model, tmp_path, "f32")
    diff = np.abs(llama_logits(out, model.token_ids) - model.reference_logits).max()
    assert diff > 0.01


# ------------------------------------------------------------------ tokenizer and metadata


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_tokenizer_matches_transformers(tiny, tmp_path, case):
    model = tiny(case)
    out = convert_to(model, tmp_path, "f16")
    expected = model.tokenizer(SAMPLE_TEXT)["input_ids"]
    assert len(expected) > 20
    assert llama_tokenize(out, SAMPLE_TEXT) == expected


@pytest.mark.slow
def test_sentencepiece_style_tokenizer_from_tokenizer_json_alone(tiny, tmp_path):
    """Without tokenizer.model the llama vocab, its scores and types come from tokenizer.json."""
    model = tiny("mistral")
    folder = tmp_path / "no-spm-model"
    shutil.copytree(model.path, folder)
    (folder / "tokenizer.model").unlink()
    out = convert_hf_to_gguf(folder, tmp_path / "x.gguf", outtype="f16")
    assert llama_tokenize(out, SAMPLE_TEXT) == model.tokenizer(SAMPLE_TEXT)["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_metadata_and_tensor_types(tiny, tmp_path, case):
    import gguf

    model = tiny(case)
    for outtype, file_type, weight_type in (("f32", 0, "F32"), ("f16", 1, "F16"), ("bf16", 32, "BF16")):
        fields, types = gguf_fields(convert_to(model, tmp_path, outtype))
        assert fields["general.name"] == model.name
        assert fields["general.file_type"] == file_type
        assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION
        assert fields["tokenizer.ggml.model"] == model.expected_tokenizer_model
        assert fields["tokenizer.ggml.pre"] == model.expected_pre
        assert types["token_embd.weight"] == weight_type
        assert types["blk.1.ffn_down.weight"] == weight_type
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["output_norm.weight"] == "F32"
    tied = case in ("smollm", "qwen2")
    assert ("output.weight" in types) is not tied
    if case == "qwen2":
        assert types["blk.0.attn_q.bias"] == types["blk.1.attn_v.bias"] == "F32"
    if case == "llama3":
        assert types["rope_freqs.weight"] == "F32"
    if case == "mistral":
        assert fields["llama.attention.key_length"] == 32


@pytest.mark.slow
def test_default_output_path_and_progress(tiny, tmp_path, monkeypatch):
    model = tiny("smollm")
    monkeypatch.setenv("GGML_PROBE_MODELS", str(tmp_path / "store"))
    calls = []
    out = convert_hf_to_gguf(model.path, progress=lambda done, total: calls.append((done, total)))
    assert out == tmp_path / "store" / f"{model.name}-F16.gguf"
    assert out.is_file()
    _, types = gguf_fields(out)
    assert calls[-1][0] == calls[-1][1] == len(types)
    assert [c[0] for c in calls] == list(range(1, len(types) + 1))
    assert not list((tmp_path / "store").glob(".*partial*"))


# ------------------------------------------------------------------ refusals (no torch needed)


def write_config(folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 128}
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    return folder


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32", cut: int = 0) -> None:
    """The safetensors layout by hand (8-byte header size, JSON header, data); `cut` drops tail bytes."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    data = len(head).to_bytes(8, "little") + head + b"".join(blobs)
    path.write_bytes(data[: len(data) - cut])


def minimal_llama(folder: Path, extra: dict[str, np.ndarray] | None = None, **kw) -> Path:
    """Just enough of a 2-layer llama checkpoint to get past the tensor checks."""
    write_config(folder)
    tensors = {"model.embed_tokens.weight": np.zeros((8, 64), np.float32)}
    tensors |= {f"model.layers.{i}.self_attn.q_proj.weight": np.zeros((64, 64), np.float32) for i in range(2)}
    write_safetensors(folder / "model.safetensors", tensors | (extra or {}), **kw)
    return folder


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    folder = write_config(tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitecture) as err:
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")
    message = str(err.value)
    assert "\n" not in message and "GPT2LMHeadModel" in message
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)
    assert set(SUPPORTED_ARCHITECTURES) >= {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


def test_new_families_refuse_a_foreign_activation_in_one_line(tmp_path):
    """Gemma's graphs run tanh-GELU and Phi-3's SiLU: a checkpoint asking for another activation is refused."""
    for arch, act in (("Gemma2ForCausalLM", {"hidden_activation": "relu"}), ("Phi3ForCausalLM", {"hidden_act": "gelu"}),
                      ("PhiForCausalLM", {"hidden_act": "silu"})):
        folder = write_config(tmp_path / arch, architectures=[arch], **act)
        with pytest.raises(ProbeError) as err:
            convert_hf_to_gguf(folder, tmp_path / "out.gguf")
        assert "hidden activation" in str(err.value) and arch in str(err.value) and "\n" not in str(err.value)
    assert {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
            "PhiForCausalLM"} <= set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda d: d.mkdir(), "config.json is missing"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{not json")), "not valid JSON"),
        (lambda d: write_config(d, architectures=None), "architectures"),
        (lambda d: write_config(d, hidden_size="big"), "hidden_size"),
        (lambda d: write_config(d), "no *.safetensors"),
        (lambda d: (write_config(d), (d / "model.safetensors").write_bytes(b"\xff" * 16)), "not a safetensors file"),
        (lambda d: minimal_llama(d, cut=4), "truncated"),
        (lambda d: minimal_llama(d, dtype="I32"), "dtype I32"),
        (lambda d: minimal_llama(d, {"model.vision_tower.weight": np.zeros(4, np.float32)}), "vision_tower"),
        (lambda d: minimal_llama(d), "neither tokenizer.json nor tokenizer.model"),
        (lambda d: (minimal_llama(d), (d / "tokenizer.json").write_text(json.dumps(
            {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": "Whitespace"},
             "added_tokens": []}))), "matches no llama.cpp pre-tokenizer"),
        (lambda d: (minimal_llama(d), (d / "tokenizer.json").write_text(json.dumps(
            {"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}))), "only BPE"),
    ],
)
def test_bad_input_folder_is_one_line_probe_error(tmp_path, setup, needle):
    folder = tmp_path / "model"
    setup(folder)
    with pytest.raises(ProbeError) as err:
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.gguf").exists()


def test_missing_folder_and_bad_outtype(tmp_path):
    with pytest.raises(ProbeError, match="not a folder"):
        convert_hf_to_gguf(tmp_path / "nowhere", tmp_path / "out.gguf")
    with pytest.raises(ProbeError, match="q4_0"):
        convert_hf_to_gguf(write_config(tmp_path / "m"), tmp_path / "out.gguf", outtype="q4_0")


def test_existing_output_is_refused_and_left_alone(tmp_path):
    folder = write_config(tmp_path / "model")
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExists):
        convert_hf_to_gguf(folder, out)
    assert out.read_bytes() == b"precious"


@pytest.mark.slow
def test_force_overwrites_and_failure_keeps_old_file(tiny, tmp_path):
    model = tiny("qwen2")
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    with pytest.raises(OutputExists):
        convert_hf_to_gguf(model.path, out, outtype="f32")
    assert convert_hf_to_gguf(model.path, out, outtype="f32", force=True) == out
    assert out.read_bytes()[:4] == b"GGUF"
    # a conversion interrupted half-way leaves the previous file whole and no temporary behind
    before = out.read_bytes()

    def interrupt(done: int, total: int) -> None:
        if done == total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_hf_to_gguf(model.path, out, outtype="f16", force=True, progress=interrupt)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


@pytest.mark.slow
def test_cli_convert_then_inspect(tiny, tmp_path):
    from click.testing import CliRunner

    from ggml_probe.cli import cli

    model = tiny("qwen2")
    out = tmp_path / "q.gguf"
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(model.path), "--outtype", "f32", "-o", str(out)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["inspect", str(out), "--json"])
    info = json.loads(res.stdout)
    assert info["architecture"] == "qwen2" and info["file_type"] == "F32"
    res = runner.invoke(cli, ["convert", str(model.path), "-o", str(out)])
    assert res.exit_code == 2 and "--force" in res.output
