"""The single-box service needs neither Ray nor a Redis client: building the app (and the CLI) imports neither."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import dataclasses, json, sys
from pathlib import Path
from cosyapp.config import Settings, StorageSettings
from cosyapp.server.app import create_app
import cosyapp.cli
app = create_app(dataclasses.replace(Settings(), storage=StorageSettings(data_dir=Path(sys.argv[1]))))
app.state.service.store.speakers.ids()
print(json.dumps({name: name in sys.modules for name in ("ray", "redis")}))
"""


def test_the_app_and_cli_import_neither_ray_nor_redis(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"ray": False, "redis": False}
