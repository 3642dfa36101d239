from google.protobuf import any_pb2 as _any_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchRequest(_message.Message):
    __slots__ = ("proxy", "since_version", "types", "names_only", "namespace", "since_versions")
    class SinceVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROXY_FIELD_NUMBER: _ClassVar[int]
    SINCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    NAMES_ONLY_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SINCE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    proxy: str
    since_version: str
    types: _containers.RepeatedScalarFieldContainer[str]
    names_only: bool
    namespace: str
    since_versions: _containers.ScalarMap[str, str]
    def __init__(self, proxy: _Optional[str] = ..., since_version: _Optional[str] = ..., types: _Optional[_Iterable[str]] = ..., names_only: _Optional[bool] = ..., namespace: _Optional[str] = ..., since_versions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("proxy", "types", "names_only")
    PROXY_FIELD_NUMBER: _ClassVar[int]
    TYPES_FIELD_NUMBER: _ClassVar[int]
    NAMES_ONLY_FIELD_NUMBER: _ClassVar[int]
    proxy: str
    types: _containers.RepeatedScalarFieldContainer[str]
    names_only: bool
    def __init__(self, proxy: _Optional[str] = ..., types: _Optional[_Iterable[str]] = ..., names_only: _Optional[bool] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ("name", "type_url", "hash", "resource", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_URL_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type_url: str
    hash: str
    resource: _any_pb2.Any
    size: int
    def __init__(self, name: _Optional[str] = ..., type_url: _Optional[str] = ..., hash: _Optional[str] = ..., resource: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., size: _Optional[int] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("proxy", "version", "revision", "type_versions", "resources", "changed_types", "counts")
    class TypeVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PROXY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TYPE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    CHANGED_TYPES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    proxy: str
    version: str
    revision: int
    type_versions: _containers.ScalarMap[str, str]
    resources: _containers.RepeatedCompositeFieldContainer[Resource]
    changed_types: _containers.RepeatedScalarFieldContainer[str]
    counts: _containers.ScalarMap[str, int]
    def __init__(self, proxy: _Optional[str] = ..., version: _Optional[str] = ..., revision: _Optional[int] = ..., type_versions: _Optional[_Mapping[str, str]] = ..., resources: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., changed_types: _Optional[_Iterable[str]] = ..., counts: _Optional[_Mapping[str, int]] = ...) -> None: ...
