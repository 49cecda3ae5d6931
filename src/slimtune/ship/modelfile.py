"""An Ollama Modelfile for an exported GGUF: `ollama create NAME -f Modelfile`.

Ollama renders prompts with Go templates, not Jinja, so the training chat template is matched
against the two shapes Ollama ships for small models, ChatML and Llama-3 headers: each has a
Go template and a Python twin that renders the same text; the twin must reproduce the Jinja
template on probe chats (with and without a system turn, several turns) or no TEMPLATE is
written, and Ollama falls back to the chat_template inside the GGUF. A system prompt that the
template injects when none is given (SmolLM2 does) becomes the Modelfile's SYSTEM, which Ollama
prepends the same way. Each end-of-turn token becomes a `PARAMETER stop`.
"""

from __future__ import annotations

from pathlib import Path

from ..utils import atomic_write_text

GO = {
    "chatml": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n"),
    "llama3": ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
               "{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
}
TWIN = {  # what the Go template above renders for a message list
    "chatml": lambda ms: "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in ms)
    + "<|im_start|>assistant\n",
    "llama3": lambda ms: "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                                 for m in ms) + "<|start_header_id|>assistant<|end_header_id|>\n\n",
}
PROBES = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "One?"},
     {"role": "assistant", "content": "Two."}, {"role": "user", "content": "Three?"}],
]


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def match_template(tokenizer, add_bos: bool) -> tuple[str, str | None] | None:
    """(Go template, default system prompt or None) equivalent to the tokenizer's chat template,
    or None when it is neither ChatML nor Llama-3 shaped."""
    bos = tokenizer.bos_token or ""
    try:
        rendered = [_render(tokenizer, p) for p in PROBES]
    except Exception:  # a template that refuses these probes (e.g. no system role) is not one of ours
        return None
    # a template may write the BOS text itself ("{{ bos_token }}"); a BOS that is the turn opener
    # (SmolLM2's is <|im_start|>) must not be taken for one, so the bare twin is tried first
    for name, twin in TWIN.items():
        for prefix in dict.fromkeys(["", bos]):
            if all(r == prefix + twin(p) for r, p in zip(rendered, PROBES)):
                return _with_system(tokenizer, name, prefix, add_bos)
    return None


def _with_system(tokenizer, name: str, prefix: str, add_bos: bool) -> tuple[str, str | None] | None:
    twin, no_system = TWIN[name], [{"role": "user", "content": "Hi there"}]
    plain = _render(tokenizer, no_system)[len(prefix):]
    system = None
    if plain != twin(no_system):  # a default system turn is injected: find its text
        system = _default_system(name, plain)
        if system is None or plain != twin([{"role": "system", "content": system}] + no_system):
            return None
    # Ollama adds BOS itself only when the GGUF's add_bos_token says so
    return ("" if add_bos else prefix) + GO[name], system


def _default_system(name: str, rendered: str) -> str | None:
    head, tail = {"chatml": ("<|im_start|>system\n", "<|im_end|>"),
                  "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")}[name]
    if not rendered.startswith(head) or tail not in rendered:
        return None
    return rendered[len(head):rendered.index(tail)]


def modelfile_text(gguf_name: str, tokenizer, meta: dict) -> str:
    """The Modelfile for `gguf_name` (a file in the same folder); meta from gguf_vocab.vocab_metadata."""
    lines = ["# Written by slimtune export. Create the model with: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}"]
    matched = match_template(tokenizer, meta["add_bos"]) if tokenizer.chat_template else None
    if matched:
        go, system = matched
        lines.append(f'TEMPLATE """{go}"""')
        if system is not None:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# The chat template is neither ChatML nor Llama-3 shaped, so no Go TEMPLATE was written:")
        lines.append("# Ollama uses the chat_template stored in the GGUF.")
    stops = [meta[k] for k in ("eot", "eos") if meta[k] is not None]
    for i in dict.fromkeys(stops):
        lines.append(f'PARAMETER stop "{meta["tokens"][i]}"')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, tokenizer, meta: dict) -> Path:
    """Write `Modelfile` beside the GGUF (atomically); returns its path."""
    out = Path(gguf_path).parent / "Modelfile"
    atomic_write_text(out, modelfile_text(Path(gguf_path).name, tokenizer, meta))
    out.chmod(0o644)  # the temp file was created 0600
    return out
