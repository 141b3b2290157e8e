"""WizardCoder's prompt templates (the reference's, verbatim)."""

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
