"""Render multi-turn conversations with transformers' `apply_chat_template` on the real DeepSeek
tokenizers and write them, with the token ids transformers produces, as the committed fixture
tests/fixtures/chat_templates/expected.json (tests/test_chat_template.py compares against it).

    python -m r1cpu.tools.make_template_fixtures [OUT_JSON]     # needs transformers (make install-reference)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT / "tests" / "fixtures" / "tokenizers"
OUT = ROOT / "tests" / "fixtures" / "chat_templates" / "expected.json"


def _turns(*pairs: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(pairs)]


TOOL_CALL = {"type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}
CONVERSATIONS = {
    "single_user": _turns("Hi!"),
    "math_notes_example": _turns("What is 2+2?", "<think>\nsimple\n</think>\n\n4", "And 3+3?"),
    "thinking_multi_turn": [
        {"role": "system", "content": "You are terse."},
        *_turns("Name a prime.", "<think>\nThe user wants a prime. 7 works.\n</think>\n\n7",
                "Another one, bigger than 100?", "<think>\n101 is prime: not divisible by 2, 3, 5, 7.\n</think>\n\n101",
                "Thanks. Now in 中文, with an emoji 😀?"),
    ],  # fmt: skip
    "two_system_messages": [
        {"role": "system", "content": "Rule one."},
        {"role": "system", "content": "Rule two."},
        *_turns("Go."),
    ],
    "several_think_closings": _turns("Q", "<think>a</think>b</think>\n\nfinal answer", "Q2"),
    "no_thinking_in_history": _turns("Hello", "Hello! How can I help?", "Write code:\n```py\nprint(1)\n```"),
    "ends_with_assistant": _turns("Say hi.", "<think>\nok\n</think>\n\nhi"),
    "tool_call": [
        *_turns("What is 2+2? Use the tool."),
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "Thanks"},
    ],
}
TEMPLATES = {"deepseek-r1": list(CONVERSATIONS), "deepseek-v2": ["single_user", "no_thinking_in_history",
                                                                 "thinking_multi_turn", "ends_with_assistant"]}  # fmt: skip


def render_cases(name: str) -> list[dict]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(TOKENIZERS / name)
    cases = []
    for key in TEMPLATES[name]:
        messages = CONVERSATIONS[key]
        for add_gen in (True, False) if key != "ends_with_assistant" else (False,):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_gen, return_dict=False)
            cases.append({"name": key, "messages": messages, "add_generation_prompt": add_gen,
                          "text": text, "ids": list(ids)})  # fmt: skip
    return cases


def main(out: str = str(OUT)) -> None:
    import transformers

    data = {
        "generated_by": f"tools/make_template_fixtures.py with transformers {transformers.__version__}",
        "templates": {name: render_cases(name) for name in TEMPLATES},
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{out}: {sum(len(c) for c in data['templates'].values())} rendered conversations")


if __name__ == "__main__":
    main(*sys.argv[1:])
