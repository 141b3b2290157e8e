"""Refresh the committed JSON schema snapshots: `python -m registry_spec.schemas`."""

import json
from pathlib import Path

from registry_spec.specs import SCHEMA_MODELS

here = Path(__file__).parent
for name, cls in SCHEMA_MODELS.items():
    (here / f"{name}.json").write_text(json.dumps(cls.model_json_schema(by_alias=True), indent=2) + "\n")
print(f"wrote {len(SCHEMA_MODELS)} schemas to {here}")
