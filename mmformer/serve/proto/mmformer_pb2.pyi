from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Iterable[float] | None = ...) -> None: ...

class EmbedTextRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Iterable[str] | None = ...) -> None: ...

class EmbedTextResponse(_message.Message):
    __slots__ = ("embeddings", "pieces_dropped")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    PIECES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    pieces_dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(
        self,
        embeddings: _Iterable[Embedding | _Mapping] | None = ...,
        pieces_dropped: _Iterable[int] | None = ...,
    ) -> None: ...

class EmbedImageRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Iterable[bytes] | None = ...) -> None: ...

class EmbedImageResponse(_message.Message):
    __slots__ = ("embeddings",)
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    def __init__(self, embeddings: _Iterable[Embedding | _Mapping] | None = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("text", "image", "index", "k")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    index: str
    k: int
    def __init__(
        self,
        text: str | None = ...,
        image: bytes | None = ...,
        index: str | None = ...,
        k: int | None = ...,
    ) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "row", "caption", "metadata_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    row: int
    caption: str
    metadata_json: str
    def __init__(
        self,
        id: str | None = ...,
        score: float | None = ...,
        row: int | None = ...,
        caption: str | None = ...,
        metadata_json: str | None = ...,
    ) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "pieces_dropped")
    HITS_FIELD_NUMBER: _ClassVar[int]
    PIECES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    pieces_dropped: int
    def __init__(self, hits: _Iterable[Hit | _Mapping] | None = ..., pieces_dropped: int | None = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("name", "kind", "count", "backend", "dim")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    count: int
    backend: str
    dim: int
    def __init__(
        self,
        name: str | None = ...,
        kind: str | None = ...,
        count: int | None = ...,
        backend: str | None = ...,
        dim: int | None = ...,
    ) -> None: ...

class BatchingInfo(_message.Message):
    __slots__ = ("enabled", "max_batch_size", "max_delay_ms", "max_queue")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    max_batch_size: int
    max_delay_ms: float
    max_queue: int
    def __init__(
        self,
        enabled: bool | None = ...,
        max_batch_size: int | None = ...,
        max_delay_ms: float | None = ...,
        max_queue: int | None = ...,
    ) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("fingerprint", "config_json", "precision", "indexes", "batching")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    config_json: str
    precision: str
    indexes: _containers.RepeatedCompositeFieldContainer[IndexInfo]
    batching: BatchingInfo
    def __init__(
        self,
        fingerprint: str | None = ...,
        config_json: str | None = ...,
        precision: str | None = ...,
        indexes: _Iterable[IndexInfo | _Mapping] | None = ...,
        batching: BatchingInfo | _Mapping | None = ...,
    ) -> None: ...
