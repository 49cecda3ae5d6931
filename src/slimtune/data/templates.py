"""Chat templates for base models that ship without one (`model.chat_template`).

Four built-ins, as Jinja strings in the Hugging Face convention (`messages`,
`add_generation_prompt`, `eos_token`), or a path to a .jinja file. A trained assistant turn must
end with a token the tokenizer has as one id (eos, or a special token), or a model trained on it
never learns to stop and render.render_chat refuses it. So each built-in closes assistant turns
with `{{ eot }}`: the format's own end-of-turn marker when the tokenizer has it as a special
token (<|im_end|> for ChatML, <|eot_id|> for Llama 3), else the tokenizer's eos.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eot }}{% else %}{{ '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eot }}{% else %}{{ '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Stanford Alpaca's prompt, one Instruction/Response pair per turn; a system turn is the preamble.
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eot + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eot }}{% else %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
BUILTIN = {"chatml": (CHATML, "<|im_end|>"), "llama3": (LLAMA3, "<|eot_id|>"),
           "alpaca": (ALPACA, None), "zephyr": (ZEPHYR, None)}


def _single_special(tokenizer, text: str | None) -> bool:
    """True when `text` is one special token of this tokenizer (so it can end a trained turn)."""
    if not text:
        return False
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] in set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}


def chat_template(spec: str, tokenizer) -> str:
    """The Jinja source for `spec` (a built-in name or a .jinja path), fitted to this tokenizer:
    `eot` is set at the top to the end-of-turn string that closes assistant turns."""
    spec = str(spec).strip()
    if spec.lower() in BUILTIN:
        template, marker = BUILTIN[spec.lower()]
        if tokenizer.eos_token is None and not _single_special(tokenizer, marker):
            raise ConfigError(f"model.chat_template={spec}: the tokenizer has no eos token to end assistant turns with")
        eot = marker if _single_special(tokenizer, marker) else tokenizer.eos_token
        return "{% set eot = " + repr(eot) + " %}" + template
    path = Path(spec).expanduser()
    if path.suffix in (".jinja", ".j2") or path.exists():
        if not path.is_file():
            raise ConfigError(f"model.chat_template: template file {path} not found")
        return path.read_text(encoding="utf-8")
    raise ConfigError(f"model.chat_template={spec!r} is not valid; choose one of: {', '.join(BUILTIN)}, "
                      "or a path to a .jinja file")
