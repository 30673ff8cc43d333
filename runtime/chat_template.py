"""Chat prompts rendered from the GGUF's `tokenizer.chat_template` exactly as transformers'
`apply_chat_template` renders them (transformers 5.x `utils/chat_template_utils.py`): a sandboxed jinja2
environment with trim_blocks and lstrip_blocks, the loopcontrols extension, `raise_exception`,
`strftime_now`, a `tojson` that does not HTML-escape, and the special tokens as variables.

DeepSeek-R1's template (deepseek-math.md §9): system text right after BOS, `<｜User｜>`/`<｜Assistant｜>`
turns, earlier assistant turns keep only what follows their last `</think>`, and the generation
prompt ends with `<｜Assistant｜><think>\\n`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# DeepSeek-R1's tokenizer_config.json template, used when a GGUF carries none.
R1_TEMPLATE = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    r"{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    r"{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}"
    r"{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}"
    r"{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' in message %}"
    r"{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}"
    r"{%- if message['content'] is none %}"
    r"{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{%- else %}"
    r"{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    r"{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}"
    r"{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    r"{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    r"{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    r"{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    r"{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    r"{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}{%- else %}"
    r"{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    r"{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %}"
)  # fmt: skip


class TemplateError(ValueError):
    pass


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body; transformers uses it for masks only."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse: {e}") from None


def _plain(messages: list[dict]) -> list[dict]:
    # transformers drops None-valued keys: templates test for a key's presence, not its value.
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


class ChatTemplate:
    """A compiled template plus the special-token variables transformers passes (bos/eos/pad/unk)."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        self.source, self.special_tokens = source, dict(special_tokens)
        self._template = _compile(source)

    @classmethod
    def from_kv(cls, kv: dict) -> "ChatTemplate":
        tokens = kv.get("tokenizer.ggml.tokens") or []
        special = {}
        for name in ("bos", "eos", "padding", "unknown"):
            tid = kv.get(f"tokenizer.ggml.{name}_token_id")
            if tid is not None and 0 <= int(tid) < len(tokens):
                special[{"padding": "pad", "unknown": "unk"}.get(name, name) + "_token"] = tokens[int(tid)]
        return cls(kv.get("tokenizer.chat_template") or R1_TEMPLATE, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        variables = {**self.special_tokens, **extra}
        try:
            return self._template.render(
                messages=_plain(messages), tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **variables,
            )  # fmt: skip
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template: {e}") from None
