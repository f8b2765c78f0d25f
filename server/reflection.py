"""Server reflection in both its versions: ``grpc.reflection.v1alpha`` (what
grpcio-reflection serves) and ``grpc.reflection.v1`` (what current grpcurl
and ``buf curl`` ask for first).

The two protocols are the same messages under two package names, field for
field, so one servicer answers both: v1 requests are read with the v1alpha
message classes. So that ``describe`` works for the v1 service too, its file
descriptor (v1alpha's, renamed) is added to the default descriptor pool.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA = "grpc.reflection.v1alpha"
V1 = "grpc.reflection.v1"
#: Full names of the reflection services, both versions.
SERVICE_NAMES = (f"{V1ALPHA}.ServerReflection", f"{V1}.ServerReflection")


def _add_v1_descriptor() -> None:
    """Add grpc/reflection/v1/reflection.proto to the default pool, built
    from v1alpha's by renaming its package (once per process)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(SERVICE_NAMES[1])
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = V1
    old, new = f".{V1ALPHA}.", f".{V1}."
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name.removeprefix(old)
    for method in proto.service[0].method:
        method.input_type = new + method.input_type.removeprefix(old)
        method.output_type = new + method.output_type.removeprefix(old)
    proto.ClearField("options")
    pool.Add(proto)


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection (both versions) on ``server``, listing
    ``service_names`` and the reflection services themselves."""
    _add_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer(
        (*service_names, *SERVICE_NAMES), pool=descriptor_pool.Default()
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                name,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            )
            for name in SERVICE_NAMES
        ]
    )
