from imago.v1 import caption_pb2 as _caption_pb2
from imago.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AskRequest(_message.Message):
    __slots__ = ("image", "question", "generation", "adapter")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.Image
    question: str
    generation: _common_pb2.GenerationSettings
    adapter: str
    def __init__(self, image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., question: _Optional[str] = ..., generation: _Optional[_Union[_common_pb2.GenerationSettings, _Mapping]] = ..., adapter: _Optional[str] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("answers", "info", "seed")
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[_caption_pb2.GeneratedText]
    info: _common_pb2.ResponseInfo
    seed: int
    def __init__(self, answers: _Optional[_Iterable[_Union[_caption_pb2.GeneratedText, _Mapping]]] = ..., info: _Optional[_Union[_common_pb2.ResponseInfo, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class AskStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: AskRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[AskRequest, _Mapping]] = ...) -> None: ...

class AskStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: AskResponse
    error: _common_pb2.ItemError
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[AskResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...
