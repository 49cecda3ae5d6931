"""Tiny random models and tokenizers for tests: built in seconds, no network.

Chat-template families covered (each a real template shape seen in the wild):
- chatml:          <|im_start|>role\\ncontent<|im_end|>\\n, eos = <|im_end|> (Qwen2.5 style)
- chatml_gen:      the same with {% generation %} markers around assistant content
- llama3:          header tokens, end of turn <|eot_id|> that is NOT eos (<|end_of_text|>)
- default_system:  ChatML that injects a default system prompt when none is given (SmolLM2 style)
- qwen3, smollm3, llama3_first, llama31, gemma, mistral, phi3: see tests/templates.py
"""

from __future__ import annotations

import torch
from templates import TEMPLATE_FAMILIES
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_GEN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
DEFAULT_SYSTEM = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named Tiny.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Rewrites earlier turns: strips <think> blocks from every assistant turn but the last (Qwen3 style).
REWRITING = (
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES = {
    "chatml": dict(template=CHATML, specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                   eos="<|im_end|>", bos=None, pad="<|endoftext|>"),
    "chatml_gen": dict(template=CHATML_GEN, specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                       eos="<|im_end|>", bos=None, pad="<|endoftext|>"),
    "llama3": dict(template=LLAMA3, specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                              "<|end_header_id|>", "<|eot_id|>"],
                   eos="<|end_of_text|>", bos="<|begin_of_text|>", pad="<|end_of_text|>"),
    "default_system": dict(template=DEFAULT_SYSTEM, specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                           eos="<|im_end|>", bos=None, pad="<|endoftext|>"),
    "rewriting": dict(template=REWRITING, specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                      eos="<|im_end|>", bos=None, pad="<|endoftext|>"),
}

FAMILIES.update(TEMPLATE_FAMILIES)

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "user assistant system You are a helpful AI assistant named Tiny.",
    "Hello! How are you today? I am fine, thank you. Tell me a joke.",
    "def add(a, b):\n    return a + b\n",
    "1. First item\n2. Second item\n- bullet\n# Heading\n**bold** `code`",
    "Summarise this text in one sentence. Translate to French: bonjour.",
] * 20


# Split regexes of real byte-level tokenizers (tokenizer.json of Llama 3 and of Qwen2/2.5/3).
SPLITS = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def make_tokenizer(family: str = "chatml", vocab_size: int = 400, split: str | None = None) -> PreTrainedTokenizerFast:
    """split: None for GPT-2's byte-level regex, or "llama3" / "qwen2" for theirs (SPLITS)."""
    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLITS[split]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=spec["eos"], bos_token=spec["bos"],
                                 pad_token=spec["pad"])
    hf.add_tokens(spec.get("added", []))  # added, not special (e.g. <think> in Qwen3)
    hf.chat_template = spec["template"]
    return hf


def make_model(tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0,
               tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=tie,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def make_qwen(tokenizer, arch: str = "qwen2", hidden: int = 32, layers: int = 2, seed: int = 0,
              tie: bool = True, extra_rows: int = 0):
    """A tiny random Qwen2 (q/k/v biases) or Qwen3 (q_norm/k_norm, head_dim 128 as in every real
    Qwen3) model; extra_rows pads the vocabulary past the tokenizer, as Qwen's 151,936 rows do."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    kw = dict(head_dim=128) if arch == "qwen3" else {}
    cfg = config_cls(vocab_size=len(tokenizer) + extra_rows, hidden_size=hidden, intermediate_size=hidden * 2,
                     num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=512, tie_word_embeddings=tie, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, **kw)
    cfg._attn_implementation = "sdpa"
    model = model_cls(cfg).eval()
    with torch.no_grad():  # random init leaves biases and norms at 0 / 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_tiny(path, family: str = "chatml", **kw):
    """Write a tiny model + tokenizer folder that slimtune can load by path."""
    tok = make_tokenizer(family)
    model = make_model(tok, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
