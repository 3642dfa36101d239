from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConfigChanged(_message.Message):
    __slots__ = ("revision", "keys")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, revision: _Optional[int] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class SnapshotChanged(_message.Message):
    __slots__ = ("revision", "version")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    version: str
    def __init__(self, revision: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class ProxyConnected(_message.Message):
    __slots__ = ("proxy", "replica", "node")
    PROXY_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    proxy: str
    replica: str
    node: NodeInfo
    def __init__(self, proxy: _Optional[str] = ..., replica: _Optional[str] = ..., node: _Optional[_Union[NodeInfo, _Mapping]] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("id", "cluster", "metadata", "user_agent_name", "user_agent_version", "user_agent_build_version", "locality", "replica", "seen_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_BUILD_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SEEN_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    cluster: str
    metadata: _struct_pb2.Struct
    user_agent_name: str
    user_agent_version: str
    user_agent_build_version: str
    locality: _struct_pb2.Struct
    replica: str
    seen_at: float
    def __init__(self, id: _Optional[str] = ..., cluster: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., user_agent_name: _Optional[str] = ..., user_agent_version: _Optional[str] = ..., user_agent_build_version: _Optional[str] = ..., locality: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., replica: _Optional[str] = ..., seen_at: _Optional[float] = ...) -> None: ...

class SnapshotManifest(_message.Message):
    __slots__ = ("proxy", "revision", "version", "layers", "versions")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROXY_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    proxy: str
    revision: int
    version: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    versions: _containers.ScalarMap[str, str]
    def __init__(self, proxy: _Optional[str] = ..., revision: _Optional[int] = ..., version: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., versions: _Optional[_Mapping[str, str]] = ...) -> None: ...
