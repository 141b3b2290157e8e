"""The README's commands for the tiny model run as written (docs cannot drift from the code)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import BUNDLED_TOKENIZER, REPO

from wizardcoder_plugin.text.tokenizer import WizardCoderTokenizer

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split("  #")[0].strip()
            if cmd.startswith("zoo ") and "wizardcoder-tiny" in cmd:
                commands.append(cmd)
    return commands


def test_readme_has_the_tiny_workflow():
    verbs = [shlex.split(c)[1] for c in readme_commands()]
    for verb in ("preprocess", "train", "predict", "eval", "export"):
        assert verb in verbs, verb


def test_readme_commands_run_as_written(tmp_path, hf_tiny):
    (tmp_path / "src").symlink_to(REPO / "src")  # the README's relative paths are from the repo root
    hf_dir = tmp_path / "hf"  # an HF checkpoint folder as users have them: weights, config and tokenizer
    shutil.copytree(hf_tiny, hf_dir)
    WizardCoderTokenizer.from_pretrained(BUNDLED_TOKENIZER).backend.save(str(hf_dir / "tokenizer.json"))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    for cmd in readme_commands():
        args = shlex.split(cmd.replace("HF_DIR", str(hf_dir)))
        r = subprocess.run([sys.executable, "-m", "registry_spec.cli", *args[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
