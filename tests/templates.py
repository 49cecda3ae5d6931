"""Chat templates of the families people bring, written here as small Jinja strings that reproduce
each family's behaviour (registered in tiny.FAMILIES, so `make_tokenizer("qwen3")` works):

- qwen3:        ChatML; assistant turns after the last user query get a <think> block (empty on the
                last turn), earlier ones lose theirs; reasoning inline in content is split off;
                tools in the system turn, <tool_call> in assistant turns, tool results as user turns.
- smollm3:      ChatML with a metadata system block always written; `/think` (default) or
                `/no_think` in the system prompt decides: reasoning blocks, or an empty think block
                in every assistant header and in the generation prompt. Reads `thinking`.
- llama3_first: the first Llama-3-Instruct template: the assistant header is appended after the
                last message whether or not asked; <|eot_id|> ends turns, eos is <|end_of_text|>.
- llama31:      Llama-3.1: a date-stamped system block always written, tools listed in it, tool
                calls as JSON, tool results in the `ipython` role.
- gemma:        no system role (folded into the first user turn), role `model`, <end_of_turn>.
- mistral:      [INST] ... [/INST], the answer closed by eos </s>, system folded into the first user turn.
- phi3:         <|user|> / <|assistant|> ... <|end|>, eos <|endoftext|> after the last turn.
"""

QWEN3 = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0].role == 'system' -%}{{- messages[0].content + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n<tools>' -}}{%- for t in tools -%}{{- '\\n' + (t | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools><|im_end|>\\n' -}}"
    "{%- elif messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- set content = m.content if m.content is string else '' -%}"
    "{%- if m.role == 'user' -%}"
    "{{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + content -}}"
    "{%- endif -%}"
    "{%- if m.tool_calls -%}{%- for tc in m.tool_calls -%}"
    "{%- if (loop.first and content) or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + tc.function.name + '\", \"arguments\": ' -}}"
    "{{- (tc.function.arguments if tc.function.arguments is string else tc.function.arguments | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

SMOLLM3 = (
    "{%- set sys = messages[0].content if messages[0].role == 'system' else '' -%}"
    "{%- set mode = '/no_think' if '/no_think' in sys else '/think' -%}"
    "{%- set custom = sys.replace('/no_think', '').replace('/think', '').strip() -%}"
    "{{- '<|im_start|>system\\n## Metadata\\n\\nReasoning Mode: ' + mode + '\\n\\n## Custom Instructions\\n\\n' -}}"
    "{{- (custom if custom else 'You are a helpful AI assistant named Tiny.') + '<|im_end|>\\n' -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- if mode == '/think' -%}"
    "{%- if m.thinking is string and m.thinking -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + m.thinking + '\\n</think>\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' + ('' if mode == '/think' else '<think>\\n\\n</think>\\n') -}}"
    "{%- endif -%}"
)

LLAMA3_FIRST = (
    "{%- for m in messages -%}"
    "{%- set content = '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' -%}"
    "{%- if loop.index0 == 0 -%}{%- set content = bos_token + content -%}{%- endif -%}"
    "{{- content -}}"
    "{%- endfor -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
)

LLAMA31 = (
    "{{- bos_token -}}"
    "{%- if not date_string is defined -%}{%- set date_string = '26 Jul 2024' -%}{%- endif -%}"
    "{%- if messages[0].role == 'system' -%}"
    "{%- set system_message = messages[0].content | trim -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_message = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
    "{%- if tools -%}{{- 'Environment: ipython\\n' -}}{%- endif -%}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' -}}"
    "{%- if tools -%}{{- 'You have access to the following functions:\\n\\n' -}}"
    "{%- for t in tools -%}{{- (t | tojson) + '\\n\\n' -}}{%- endfor -%}{%- endif -%}"
    "{{- system_message + '<|eot_id|>' -}}"
    "{%- for m in loop_messages -%}"
    "{%- if m.role == 'assistant' and m.tool_calls -%}"
    "{%- set tc = m.tool_calls[0].function -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + tc.name + '\", \"parameters\": ' -}}"
    "{{- (tc.arguments | tojson) + '}<|eot_id|>' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' -}}"
    "{%- else -%}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

GEMMA = (
    "{{- bos_token -}}"
    "{%- if messages[0].role == 'system' -%}"
    "{%- set first_user_prefix = messages[0].content + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
    "{%- set role = 'model' if m.role == 'assistant' else m.role -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + m.content | trim + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

MISTRAL = (
    "{{- bos_token -}}"
    "{%- if messages[0].role == 'system' -%}"
    "{%- set system_message = messages[0].content -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_message = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{%- if m.role == 'user' -%}"
    "{%- if loop.first and system_message -%}{{- '[INST] ' + system_message + '\\n\\n' + m.content + ' [/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + m.content + ' [/INST]' -}}{%- endif -%}"
    "{%- elif m.role == 'assistant' -%}{{- ' ' + m.content | trim + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

PHI3 = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{- '<|system|>\\n' + m.content + '<|end|>\\n' -}}"
    "{%- elif m.role == 'user' -%}{{- '<|user|>\\n' + m.content + '<|end|>\\n' -}}"
    "{%- elif m.role == 'assistant' -%}{{- '<|assistant|>\\n' + m.content + '<|end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
)

ZEPHYR = (
    "{%- for m in messages -%}"
    "{{- '<|' + m.role + '|>\\n' + m.content + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

VICUNA = (
    "{%- if messages[0].role == 'system' -%}{%- set sys = messages[0].content -%}{%- set msgs = messages[1:] -%}"
    "{%- else -%}{%- set sys = 'A chat between a curious user and an artificial intelligence assistant.' -%}"
    "{%- set msgs = messages -%}{%- endif -%}"
    "{{- bos_token + sys + ' ' -}}"
    "{%- for m in msgs -%}"
    "{%- if m.role == 'user' -%}{{- 'USER: ' + m.content + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + m.content + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

GRANITE = (
    "{%- if messages[0].role == 'system' -%}{%- set sys = messages[0].content -%}{%- set msgs = messages[1:] -%}"
    "{%- else -%}{%- set sys = 'Knowledge Cutoff Date: April 2024.\\nToday\\'s Date: April 1, 2025.\\n"
    "You are Granite, developed by IBM.' -%}{%- set msgs = messages -%}{%- endif -%}"
    "{{- '<|start_of_role|>system<|end_of_role|>' + sys + '<|end_of_text|>\\n' -}}"
    "{%- for m in msgs -%}"
    "{{- '<|start_of_role|>' + m.role + '<|end_of_role|>' + m.content + '<|end_of_text|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_of_role|>assistant<|end_of_role|>' -}}{%- endif -%}"
)

PHI4 = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '<|im_sep|>' + m.content + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant<|im_sep|>' -}}{%- endif -%}"
)

COMMAND_R = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- set tag = {'system': '<|SYSTEM_TOKEN|>', 'user': '<|USER_TOKEN|>', 'assistant': '<|CHATBOT_TOKEN|>'}[m.role] -%}"
    "{{- '<|START_OF_TURN_TOKEN|>' + tag + m.content + '<|END_OF_TURN_TOKEN|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' -}}{%- endif -%}"
)

DEEPSEEK_R1 = (
    "{{- bos_token -}}"
    "{%- for m in messages if m.role == 'system' -%}{{- m.content -}}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- '<｜User｜>' + m.content -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- set content = m.content.split('</think>')[-1] if '</think>' in m.content else m.content -%}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)

GENERATION_TAGS = (  # HF's {% generation %} markers (for return_assistant_tokens_mask) around each answer
    "{%- for m in messages -%}{%- if m.role == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- m.content + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_CHATML = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
_LLAMA = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
_THINK = ["<think>", "</think>"]  # added but not special, as in Qwen3 / SmolLM3

TEMPLATE_FAMILIES = {
    "qwen3": dict(template=QWEN3, specials=_CHATML, eos="<|im_end|>", bos=None, pad="<|endoftext|>",
                  added=_THINK + ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]),
    "smollm3": dict(template=SMOLLM3, specials=_CHATML, eos="<|im_end|>", bos=None, pad="<|endoftext|>",
                    added=_THINK),
    "llama3_first": dict(template=LLAMA3_FIRST, specials=_LLAMA, eos="<|end_of_text|>", bos="<|begin_of_text|>",
                         pad="<|end_of_text|>"),
    "llama31": dict(template=LLAMA31, specials=_LLAMA, eos="<|end_of_text|>", bos="<|begin_of_text|>",
                    pad="<|end_of_text|>"),
    "gemma": dict(template=GEMMA, specials=["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
                  eos="<eos>", bos="<bos>", pad="<pad>"),
    "mistral": dict(template=MISTRAL, specials=["<s>", "</s>", "[INST]", "[/INST]"], eos="</s>", bos="<s>",
                    pad="</s>"),
    "phi3": dict(template=PHI3, specials=["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
                 eos="<|endoftext|>", bos=None, pad="<|endoftext|>"),
}


# More families (tests/data/test_more_templates.py, test_render.py): spec + the end of turn each answer ends with
MORE = {
    "zephyr": dict(template=ZEPHYR, specials=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
                   eos="</s>", bos="<s>", pad="</s>", eot="</s>"),
    "vicuna": dict(template=VICUNA, specials=["<s>", "</s>"], eos="</s>", bos="<s>", pad="</s>", eot="</s>",
                   lead=" "),
    "granite": dict(template=GRANITE, specials=["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"],
                    eos="<|end_of_text|>", bos=None, pad="<|end_of_text|>", eot="<|end_of_text|>"),
    "phi4": dict(template=PHI4, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"],
                 eos="<|im_end|>", bos=None, pad="<|endoftext|>", eot="<|im_end|>"),
    "command_r": dict(template=COMMAND_R, specials=["<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>",
                                                    "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<PAD>"],
                      eos="<|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>", pad="<PAD>", eot="<|END_OF_TURN_TOKEN|>"),
    "generation_tags": dict(template=GENERATION_TAGS, specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                            eos="<|im_end|>", bos=None, pad="<|endoftext|>", eot="<|im_end|>"),
    "deepseek_r1": dict(template=DEEPSEEK_R1, specials=["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                                        "<｜User｜>", "<｜Assistant｜>"],
                        eos="<｜end▁of▁sentence｜>", bos="<｜begin▁of▁sentence｜>", pad="<｜end▁of▁sentence｜>",
                        eot="<｜end▁of▁sentence｜>", added=["<think>", "</think>"]),
}
TEMPLATE_FAMILIES.update({k: {f: v for f, v in spec.items() if f not in ("eot", "lead")} for k, spec in MORE.items()})
