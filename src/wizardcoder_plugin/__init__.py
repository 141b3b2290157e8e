"""WizardCoder (StarCoder / GPTBigCode) on MindSpore, as a plugin of the `zoo` registry.

Importing this package is cheap: MindSpore, mindformers and tokenizers load only when a command needs them.
"""

import os

# MindSpore's C++ logging (warnings on every graph) is quiet unless the user asks for it
os.environ.setdefault("GLOG_v", "3")

__version__ = "0.1.0"
