"""Text in and out: StarCoder's BPE tokenizer and WizardCoder's prompt templates."""
