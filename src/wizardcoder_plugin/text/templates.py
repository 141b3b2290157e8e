"""WizardCoder's prompt templates (the reference's, verbatim), its chat rendering over them, and StarCoder's
fill-in-the-middle format."""

from __future__ import annotations

from registry_spec.errors import InputError

INSTRUCTION = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:"
)
INSTRUCTION_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
TEMPLATES = ("default", "wizardcoder", "none")


def apply_template(text: str, template: str = "default", input_text: str = "") -> str:
    if template in ("default", "wizardcoder"):
        if input_text:
            return INSTRUCTION_WITH_INPUT.format(instruction=text, input=input_text)
        return INSTRUCTION.format(instruction=text)
    if template == "none":
        return text
    raise InputError(f"unknown template {template!r}", "use --template wizardcoder or --template none")


PREAMBLE = INSTRUCTION.split("\n\n", 1)[0]
FIM = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")  # StarCoder's fill-in-the-middle tokens (PSM order)


def chat_prompt(messages: list[dict[str, str]]) -> str:
    """Chat messages in WizardCoder's instruction format: a system message replaces the preamble, each user turn
    is an instruction, each assistant turn its response. One user message renders exactly as the template does."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise InputError("the last chat message must be the user's", "end the messages with a user message")
    parts = ["\n\n".join(system) if system else PREAMBLE]
    for m in turns:
        if m["role"] == "user":
            parts.append(f"\n\n### Instruction:\n{m['content']}\n\n### Response:")
        else:
            parts.append(m["content"])
    return "".join(parts)


def infill_prompt(prefix: str, suffix: str) -> str:
    """StarCoder's prefix-suffix-middle prompt: the model writes the middle, then its end-of-text token."""
    return f"{FIM[0]}{prefix}{FIM[1]}{suffix}{FIM[2]}"
