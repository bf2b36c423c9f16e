from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_CLS: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]
    POOLING_CLS_MEAN: _ClassVar[Pooling]

class TokenDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_DTYPE_UNSPECIFIED: _ClassVar[TokenDtype]
    TOKEN_DTYPE_FLOAT32: _ClassVar[TokenDtype]
    TOKEN_DTYPE_FLOAT16: _ClassVar[TokenDtype]
    TOKEN_DTYPE_BFLOAT16: _ClassVar[TokenDtype]
POOLING_UNSPECIFIED: Pooling
POOLING_CLS: Pooling
POOLING_MEAN: Pooling
POOLING_CLS_MEAN: Pooling
TOKEN_DTYPE_UNSPECIFIED: TokenDtype
TOKEN_DTYPE_FLOAT32: TokenDtype
TOKEN_DTYPE_FLOAT16: TokenDtype
TOKEN_DTYPE_BFLOAT16: TokenDtype

class PatchTokensOptions(_message.Message):
    __slots__ = ("enabled", "dtype", "normalize")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    dtype: TokenDtype
    normalize: bool
    def __init__(self, enabled: _Optional[bool] = ..., dtype: _Optional[_Union[TokenDtype, str]] = ..., normalize: _Optional[bool] = ...) -> None: ...

class PatchTokens(_message.Message):
    __slots__ = ("rows", "cols", "dim", "dtype", "data")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    dim: int
    dtype: TokenDtype
    data: bytes
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[TokenDtype, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "id")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    id: str
    def __init__(self, data: _Optional[bytes] = ..., id: _Optional[str] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("images", "pooling", "normalize", "timeout_ms", "patch_tokens")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    PATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    pooling: Pooling
    normalize: bool
    timeout_ms: int
    patch_tokens: PatchTokensOptions
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., normalize: _Optional[bool] = ..., timeout_ms: _Optional[int] = ..., patch_tokens: _Optional[_Union[PatchTokensOptions, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("id", "values", "error", "patch_tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: str
    values: _containers.RepeatedScalarFieldContainer[float]
    error: Error
    patch_tokens: PatchTokens
    def __init__(self, id: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., patch_tokens: _Optional[_Union[PatchTokens, _Mapping]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("preprocess_ms", "queue_ms", "inference_ms", "total_ms")
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    preprocess_ms: float
    queue_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, preprocess_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "error", "timing")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    error: Error
    timing: Timing
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "revision", "embedding_dim", "image_size", "dtype", "device", "max_batch_size", "max_images_per_request", "max_image_bytes", "max_image_pixels", "max_request_bytes", "max_queue_images", "server_version", "max_queue_s", "preprocess", "patch_size")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    embedding_dim: int
    image_size: int
    dtype: str
    device: str
    max_batch_size: int
    max_images_per_request: int
    max_image_bytes: int
    max_image_pixels: int
    max_request_bytes: int
    max_queue_images: int
    server_version: str
    max_queue_s: float
    preprocess: str
    patch_size: int
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., image_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., max_queue_images: _Optional[int] = ..., server_version: _Optional[str] = ..., max_queue_s: _Optional[float] = ..., preprocess: _Optional[str] = ..., patch_size: _Optional[int] = ...) -> None: ...
