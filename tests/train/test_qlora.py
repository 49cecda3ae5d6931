"""QLoRA on CPU: an NF4 (double-quantised) base through bitsandbytes, LoRA trained on top.

One tiny run, trained through the loop's own pieces, serves every test: the loss falls, only the
LoRA weights change while the base stays 4-bit, a resumed run ends with the same adapter, the
merged model matches the adapter model, and chat answers."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_loop import run_args, write_data

from slimtune.config import build_config
from slimtune.train.loop import checkpoint, finish, setup, step, train

pytest.importorskip("bitsandbytes")


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def qlora_run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    data = write_data(tmp / "d.jsonl")
    args = run_args(tiny_dir, data, tmp / "run", **{"method.name": "qlora", "train.max_steps": 4,
                                                    "train.save_every": 2, "train.keep_checkpoints": 2})
    s = setup(build_config({}, args), quiet)
    frozen = {n: p.detach().clone() for n, p in s.model.named_parameters() if not p.requires_grad}
    trained0 = {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
    losses = []
    while s.loop["step"] < s.total_steps:
        losses.append(step(s)["loss"])
        if s.loop["step"] % 2 == 0 and s.loop["step"] < s.total_steps:
            checkpoint(s)
    summary = finish(s, quiet)
    return dict(s=s, frozen=frozen, trained0=trained0, losses=losses, summary=summary, args=args,
                run=tmp / "run", tmp=tmp)


def test_base_is_4bit_and_only_lora_trains(qlora_run):
    import bitsandbytes as bnb

    model = qlora_run["s"].model
    four = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four and all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in four)
    assert all(m.weight.dtype == torch.uint8 for m in four)  # packed, two weights a byte
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in qlora_run["frozen"].items())  # 4-bit base untouched
    changed = [n for n, p in qlora_run["trained0"].items() if not torch.equal(after[n], p)]
    assert changed and all("lora_" in n for n in qlora_run["trained0"])
    assert all(after[n].dtype == torch.float32 for n in qlora_run["trained0"])


def test_loss_falls(qlora_run):
    b, a = qlora_run["summary"]["before"]["eval_loss"], qlora_run["summary"]["after"]["eval_loss"]
    assert a < b - 0.05, (b, a)
    assert qlora_run["losses"][-1] < qlora_run["losses"][0]


def test_resume_gives_the_same_adapter(qlora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(qlora_run["run"] / "checkpoints", run / "checkpoints")
    shutil.rmtree(run / "checkpoints" / "step-000004", ignore_errors=True)
    (run / "checkpoints" / "latest").write_text("step-000002")
    args = [a for a in qlora_run["args"] if not a.startswith("train.output_dir")]
    train(build_config({}, args + [f"train.output_dir={run}", "train.resume=true"]), quiet)
    a = load_file(str(qlora_run["run"] / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_merge_dequantises_and_matches_the_adapter(qlora_run, capsys):
    from transformers import AutoModelForCausalLM

    from slimtune.ship.merge import merge_run

    out = qlora_run["tmp"] / "merged"
    res = merge_run(str(qlora_run["run"]), str(out), "float32", log=print)
    print(f"QLoRA merge parity: merged {res['max_abs_logit_diff_merged']:.2e}, saved {res['max_abs_logit_diff_saved']:.2e}")
    assert res["max_abs_logit_diff_merged"] < 1e-4 and res["max_abs_logit_diff_saved"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # de-quantised, plain Linear


def test_chat_answers_greedily(qlora_run):
    from slimtune.generate import generate
    from slimtune.runfolder import load_run

    import bitsandbytes as bnb

    model, tok, cfg = load_run(str(qlora_run["run"]))
    assert cfg.method.name == "qlora" and any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    msgs = [{"role": "user", "content": "hello how are you"}]
    a = generate(model, tok, msgs, max_new_tokens=8)
    assert a["n_tokens"] > 0 and a["text"] == generate(model, tok, msgs, max_new_tokens=8)["text"]


def test_eval_answers_base_and_tuned_in_one_batch(qlora_run, gen_cache):
    """QLoRA's 4-bit LoRA layers take base rows and tuned rows in one batch (generate.can_mix):
    the same greedy answers as the adapter switched off and on, one prompt at a time."""
    from slimtune.evaluate.base_vs_tuned import BaseVsTuned
    from slimtune.generate import GenSettings, can_mix
    from slimtune.generate import generate

    pair = BaseVsTuned(str(qlora_run["run"]))
    assert can_mix(pair.model)
    chats = [[{"role": "user", "content": t}] for t in ("hello how are you", "a b c", "tell me more please")]
    base, tuned = pair.answer_both(chats, GenSettings(max_new_tokens=6), batch_size=8, use_cache=False)
    with pair.base() as b:
        assert [a["text"] for a in base] == [generate(b, pair.tok, c, 6)["text"] for c in chats]
    assert [a["text"] for a in tuned] == [generate(pair.model, pair.tok, c, 6)["text"] for c in chats]


@pytest.mark.parametrize("hidden", [32, 128])
def test_gradients_reach_lower_layers_after_an_evaluation(tmp_path, hidden):
    """An eval-mode pass must not switch a 4-bit layer to a kernel without autograd: on a CPU with
    AVX512-BF16 bitsandbytes repacks weights for a bf16 kernel at the first no-grad eval forward,
    after which training forwards cut the gradient to every layer below (and narrow layers fail).
    The LoRA gradients of the first layer are the same before and after an evaluation. hidden=32
    has layers narrower than the 64-wide quantisation block (the repacking fails on them); 128 has
    only layers the bf16 kernel accepts (it repacks them, and the gradient would be cut)."""
    from tiny import save_tiny

    from slimtune.config import MethodCfg
    from slimtune.methods import apply_method
    from slimtune.models import load_model

    base = save_tiny(tmp_path / "m", hidden=hidden)
    model = apply_method(load_model(base, quantize_4bit=True), MethodCfg(name="qlora", r=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.tensor([[5, 9, 12, 7, 3, 11, 4, 8]])

    def first_layer_grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "layers.0." in n and p.grad is not None}

    before = first_layer_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = first_layer_grads()
    assert before and before.keys() == after.keys()
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=1e-5, atol=1e-7)
