"""JSON documents by namespace and key (conversations and other small records), on the local disk.

A document is `<root>/<namespace>/<key>.json`, replaced atomically on every write. Namespaces and keys share the
task ids' rule (letters, digits, `_ . -`, no leading dot), so they are safe file names and store keys."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cosyapp.engine.types import InputError
from cosyapp.storage.tasks import write_atomic

DOCUMENT_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_document_key(what: str, name: str) -> str:
    if not isinstance(name, str) or not DOCUMENT_KEY.fullmatch(name):
        raise InputError(f"invalid {what} {name!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a "
                         "letter or digit")
    return name


class DiskDocuments:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, namespace: str, key: str) -> Path:
        return self.root / check_document_key("namespace", namespace) / f"{check_document_key('key', key)}.json"

    def get(self, namespace: str, key: str) -> Any | None:
        try:
            return json.loads(self._path(namespace, key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def put(self, namespace: str, key: str, document: Any) -> None:
        path = self._path(namespace, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(document, ensure_ascii=False).encode("utf-8"))

    def delete(self, namespace: str, key: str) -> bool:
        path = self._path(namespace, key)
        existed = path.is_file()
        path.unlink(missing_ok=True)
        return existed

    def keys(self, namespace: str) -> list[str]:
        folder = self.root / check_document_key("namespace", namespace)
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.json") if DOCUMENT_KEY.fullmatch(p.stem))
