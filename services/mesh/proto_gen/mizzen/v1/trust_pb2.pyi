from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetTrustBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrustBundle(_message.Message):
    __slots__ = ("root_certs", "trust_domain", "token_public_keys", "signing_root_sha256")
    ROOT_CERTS_FIELD_NUMBER: _ClassVar[int]
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    SIGNING_ROOT_SHA256_FIELD_NUMBER: _ClassVar[int]
    root_certs: _containers.RepeatedScalarFieldContainer[str]
    trust_domain: str
    token_public_keys: _containers.RepeatedScalarFieldContainer[str]
    signing_root_sha256: str
    def __init__(self, root_certs: _Optional[_Iterable[str]] = ..., trust_domain: _Optional[str] = ..., token_public_keys: _Optional[_Iterable[str]] = ..., signing_root_sha256: _Optional[str] = ...) -> None: ...
