"""Where the service keeps what must outlive a request: one small interface, two places.

`open_store(storage)` gives a `Store` of four parts:
- `speakers`: the speaker registry (ids, get, add, remove, rename); a stored voice carries its recording,
  transcript, metadata and prompt features keyed by the model that computed them (`voices.load_voice`);
- `default_prompt`: the voice set with `cosyapp prompts set-default` (get, set, clear);
- `tasks`: the async tasks' records and results, with leases in a shared store (`storage/tasks.py`);
- `documents`: JSON documents by namespace and key (get, put, delete, keys), e.g. a conversation per id.

`[storage] shared_store` empty (the default): the local disk under `[storage] data_dir`, today's layout, for one
box. `redis://host:port/db`: the shared store of a cluster (`storage/redis_store.py`), which every replica
reads and writes, so a voice registered through one replica is used by all, and any replica answers a task.
The Redis client is imported only then: a single box needs neither it nor a Redis server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cosyapp.config import StorageSettings

if TYPE_CHECKING:
    import numpy as np

    from cosyapp.storage.tasks import Task
    from cosyapp.voices import VoiceFiles


class StoredVoice(Protocol):
    """A registered voice as `voices.load_voice` reads it."""

    @property
    def id(self) -> str: ...

    @property
    def key(self) -> str: ...  # with `version`: the prepared-voice cache's key

    @property
    def version(self) -> int: ...  # changes whenever the voice is rewritten

    @property
    def text(self) -> str | None: ...

    @property
    def meta(self) -> dict[str, Any]: ...

    def features_for(self, fingerprint: str) -> dict[str, Any] | None: ...

    def recording(self) -> tuple[np.ndarray, int]: ...

    def keep_features(self, fingerprint: str, state: dict[str, Any]) -> None: ...


class SpeakerStore(Protocol):
    """Errors are InputError: an invalid or unknown id, an id that is taken."""

    def ids(self) -> list[str]: ...

    def get(self, speaker_id: str) -> StoredVoice: ...

    def add(self, speaker_id: str, files: VoiceFiles) -> StoredVoice: ...

    def remove(self, speaker_id: str) -> None: ...

    def rename(self, old_id: str, new_id: str) -> StoredVoice: ...


class PromptStore(Protocol):
    def get(self) -> StoredVoice | None: ...

    def set(self, files: VoiceFiles) -> StoredVoice: ...

    def clear(self) -> bool: ...


class TaskStore(Protocol):
    leases: bool  # True: running tasks hold leases (several processes share the store)

    def tasks(self) -> list[Task]: ...

    def load(self, step_id: str) -> Task | None: ...

    def save(self, task: Task) -> None: ...

    def finish(self, task: Task) -> bool: ...  # False when the stored record had finished already

    def delete(self, step_id: str) -> None: ...

    def write_result(self, task: Task, data: bytes) -> None: ...

    def read_result(self, task: Task) -> bytes | None: ...

    def renew(self, step_id: str, seconds: float) -> None: ...

    def alive(self, step_id: str) -> bool: ...

    def release(self, step_id: str) -> None: ...


class DocumentStore(Protocol):
    def get(self, namespace: str, key: str) -> Any | None: ...

    def put(self, namespace: str, key: str, document: Any) -> None: ...

    def delete(self, namespace: str, key: str) -> bool: ...

    def keys(self, namespace: str) -> list[str]: ...


@dataclass(frozen=True)
class Store:
    speakers: SpeakerStore  # voices.SpeakerRegistry or redis_store.RedisSpeakers
    default_prompt: PromptStore  # voices.DefaultPromptStore or redis_store.RedisDefaultPrompt
    tasks: TaskStore  # tasks.DiskTaskStore or redis_store.RedisTasks
    documents: DocumentStore
    shared: bool  # False: the local disk of one box


def open_store(storage: StorageSettings) -> Store:
    """The store `[storage]` configures (see the module docstring)."""
    if storage.shared_store:
        from cosyapp.storage.redis_store import open_redis_store

        return open_redis_store(storage.shared_store)
    from cosyapp.storage.documents import DiskDocuments
    from cosyapp.storage.tasks import DiskTaskStore
    from cosyapp.voices import DefaultPromptStore, SpeakerRegistry

    return Store(speakers=SpeakerRegistry(storage.speakers_dir),
                 default_prompt=DefaultPromptStore(storage.default_prompt_dir),
                 tasks=DiskTaskStore(storage.tasks_dir), documents=DiskDocuments(storage.documents_dir),
                 shared=False)
