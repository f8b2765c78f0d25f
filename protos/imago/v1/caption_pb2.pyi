from imago.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CaptionRequest(_message.Message):
    __slots__ = ("image", "prefix", "generation", "adapter")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.Image
    prefix: str
    generation: _common_pb2.GenerationSettings
    adapter: str
    def __init__(self, image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., prefix: _Optional[str] = ..., generation: _Optional[_Union[_common_pb2.GenerationSettings, _Mapping]] = ..., adapter: _Optional[str] = ...) -> None: ...

class GeneratedText(_message.Message):
    __slots__ = ("text", "score")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    text: str
    score: float
    def __init__(self, text: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class CaptionResponse(_message.Message):
    __slots__ = ("captions", "info", "seed")
    CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    captions: _containers.RepeatedCompositeFieldContainer[GeneratedText]
    info: _common_pb2.ResponseInfo
    seed: int
    def __init__(self, captions: _Optional[_Iterable[_Union[GeneratedText, _Mapping]]] = ..., info: _Optional[_Union[_common_pb2.ResponseInfo, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class CaptionStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: CaptionRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[CaptionRequest, _Mapping]] = ...) -> None: ...

class CaptionStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: CaptionResponse
    error: _common_pb2.ItemError
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[CaptionResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...
