"""WizardCoder (StarCoder / GPTBigCode) on MindSpore, as a plugin of the `zoo` registry.

Importing this package is cheap: MindSpore, mindformers and tokenizers load only when a command needs them.
"""

__version__ = "0.1.0"
