from imago.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PreviewMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREVIEW_METHOD_UNSPECIFIED: _ClassVar[PreviewMethod]
    PREVIEW_METHOD_LATENT_RGB: _ClassVar[PreviewMethod]
    PREVIEW_METHOD_TAESD: _ClassVar[PreviewMethod]
    PREVIEW_METHOD_FULL: _ClassVar[PreviewMethod]
PREVIEW_METHOD_UNSPECIFIED: PreviewMethod
PREVIEW_METHOD_LATENT_RGB: PreviewMethod
PREVIEW_METHOD_TAESD: PreviewMethod
PREVIEW_METHOD_FULL: PreviewMethod

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "num_images", "output_format", "previews", "scheduler", "output_quality", "omit_parameters", "loras", "text_to_image", "image_to_image", "inpaint")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_QUALITY_FIELD_NUMBER: _ClassVar[int]
    OMIT_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    TEXT_TO_IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TO_IMAGE_FIELD_NUMBER: _ClassVar[int]
    INPAINT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    output_format: _common_pb2.ImageFormat
    previews: PreviewOptions
    scheduler: str
    output_quality: int
    omit_parameters: bool
    loras: _containers.RepeatedCompositeFieldContainer[LoraWeight]
    text_to_image: TextToImage
    image_to_image: ImageToImage
    inpaint: Inpaint
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., output_format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., previews: _Optional[_Union[PreviewOptions, _Mapping]] = ..., scheduler: _Optional[str] = ..., output_quality: _Optional[int] = ..., omit_parameters: _Optional[bool] = ..., loras: _Optional[_Iterable[_Union[LoraWeight, _Mapping]]] = ..., text_to_image: _Optional[_Union[TextToImage, _Mapping]] = ..., image_to_image: _Optional[_Union[ImageToImage, _Mapping]] = ..., inpaint: _Optional[_Union[Inpaint, _Mapping]] = ...) -> None: ...

class LoraWeight(_message.Message):
    __slots__ = ("name", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class TextToImage(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ImageToImage(_message.Message):
    __slots__ = ("init_image", "strength", "style_image", "style_scale")
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    STYLE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STYLE_SCALE_FIELD_NUMBER: _ClassVar[int]
    init_image: _common_pb2.Image
    strength: float
    style_image: _common_pb2.Image
    style_scale: float
    def __init__(self, init_image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., strength: _Optional[float] = ..., style_image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., style_scale: _Optional[float] = ...) -> None: ...

class Inpaint(_message.Message):
    __slots__ = ("image", "mask", "strength")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.Image
    mask: _common_pb2.Image
    strength: float
    def __init__(self, image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., mask: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., strength: _Optional[float] = ...) -> None: ...

class PreviewOptions(_message.Message):
    __slots__ = ("every_n_steps", "format", "max_size", "method", "all_images")
    EVERY_N_STEPS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ALL_IMAGES_FIELD_NUMBER: _ClassVar[int]
    every_n_steps: int
    format: _common_pb2.ImageFormat
    max_size: int
    method: PreviewMethod
    all_images: bool
    def __init__(self, every_n_steps: _Optional[int] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., max_size: _Optional[int] = ..., method: _Optional[_Union[PreviewMethod, str]] = ..., all_images: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "queued", "started", "progress", "preview", "result")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queued: Queued
    started: Started
    progress: Progress
    preview: Preview
    result: Result
    def __init__(self, request_id: _Optional[str] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("worker", "total_steps")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    worker: str
    total_steps: int
    def __init__(self, worker: _Optional[str] = ..., total_steps: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "elapsed_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    elapsed_seconds: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("step", "image_index", "image")
    STEP_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    step: int
    image_index: int
    image: _common_pb2.Image
    def __init__(self, step: _Optional[int] = ..., image_index: _Optional[int] = ..., image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("image", "seed", "nsfw_detected", "replaced")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NSFW_DETECTED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.Image
    seed: int
    nsfw_detected: bool
    replaced: bool
    def __init__(self, image: _Optional[_Union[_common_pb2.Image, _Mapping]] = ..., seed: _Optional[int] = ..., nsfw_detected: _Optional[bool] = ..., replaced: _Optional[bool] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("images", "info", "warnings")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    info: _common_pb2.ResponseInfo
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ..., info: _Optional[_Union[_common_pb2.ResponseInfo, _Mapping]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...
