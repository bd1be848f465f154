from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrepareModelRequest(_message.Message):
    __slots__ = ("source", "revision", "output", "tp_degree", "dtype", "gqa_strategy", "force", "allow_pickle", "name", "quantize", "quantize_lm_head")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TP_DEGREE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GQA_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PICKLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_LM_HEAD_FIELD_NUMBER: _ClassVar[int]
    source: str
    revision: str
    output: str
    tp_degree: int
    dtype: str
    gqa_strategy: str
    force: bool
    allow_pickle: bool
    name: str
    quantize: str
    quantize_lm_head: bool
    def __init__(self, source: _Optional[str] = ..., revision: _Optional[str] = ..., output: _Optional[str] = ..., tp_degree: _Optional[int] = ..., dtype: _Optional[str] = ..., gqa_strategy: _Optional[str] = ..., force: _Optional[bool] = ..., allow_pickle: _Optional[bool] = ..., name: _Optional[str] = ..., quantize: _Optional[str] = ..., quantize_lm_head: _Optional[bool] = ...) -> None: ...

class CompileGraphsRequest(_message.Message):
    __slots__ = ("manifest_uri", "device", "max_batch_size", "max_seq_len", "context_buckets", "kv_buckets", "batch_buckets", "output", "force", "prefer", "speculation", "num_speculative_tokens")
    MANIFEST_URI_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    KV_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    BATCH_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    PREFER_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_FIELD_NUMBER: _ClassVar[int]
    NUM_SPECULATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    manifest_uri: str
    device: str
    max_batch_size: int
    max_seq_len: int
    context_buckets: _containers.RepeatedScalarFieldContainer[int]
    kv_buckets: _containers.RepeatedScalarFieldContainer[int]
    batch_buckets: _containers.RepeatedScalarFieldContainer[int]
    output: str
    force: bool
    prefer: str
    speculation: str
    num_speculative_tokens: int
    def __init__(self, manifest_uri: _Optional[str] = ..., device: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., context_buckets: _Optional[_Iterable[int]] = ..., kv_buckets: _Optional[_Iterable[int]] = ..., batch_buckets: _Optional[_Iterable[int]] = ..., output: _Optional[str] = ..., force: _Optional[bool] = ..., prefer: _Optional[str] = ..., speculation: _Optional[str] = ..., num_speculative_tokens: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "bytes_done", "bytes_total", "tensors_done", "tensors_total", "graphs_done", "graphs_total")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_DONE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_DONE_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    bytes_done: int
    bytes_total: int
    tensors_done: int
    tensors_total: int
    graphs_done: int
    graphs_total: int
    def __init__(self, stage: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., tensors_done: _Optional[int] = ..., tensors_total: _Optional[int] = ..., graphs_done: _Optional[int] = ..., graphs_total: _Optional[int] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("operation_id", "state", "progress", "manifest_uri", "error", "artifact_key", "reused", "request", "created_unix", "updated_unix", "kind", "compile_request", "graph_set_uri", "graph_key")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Operation.State]
        PENDING: _ClassVar[Operation.State]
        RUNNING: _ClassVar[Operation.State]
        SUCCEEDED: _ClassVar[Operation.State]
        FAILED: _ClassVar[Operation.State]
        CANCELLED: _ClassVar[Operation.State]
    STATE_UNSPECIFIED: Operation.State
    PENDING: Operation.State
    RUNNING: Operation.State
    SUCCEEDED: Operation.State
    FAILED: Operation.State
    CANCELLED: Operation.State
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_URI_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_KEY_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COMPILE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SET_URI_FIELD_NUMBER: _ClassVar[int]
    GRAPH_KEY_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    state: Operation.State
    progress: Progress
    manifest_uri: str
    error: str
    artifact_key: str
    reused: bool
    request: PrepareModelRequest
    created_unix: float
    updated_unix: float
    kind: str
    compile_request: CompileGraphsRequest
    graph_set_uri: str
    graph_key: str
    def __init__(self, operation_id: _Optional[str] = ..., state: _Optional[_Union[Operation.State, str]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., manifest_uri: _Optional[str] = ..., error: _Optional[str] = ..., artifact_key: _Optional[str] = ..., reused: _Optional[bool] = ..., request: _Optional[_Union[PrepareModelRequest, _Mapping]] = ..., created_unix: _Optional[float] = ..., updated_unix: _Optional[float] = ..., kind: _Optional[str] = ..., compile_request: _Optional[_Union[CompileGraphsRequest, _Mapping]] = ..., graph_set_uri: _Optional[str] = ..., graph_key: _Optional[str] = ...) -> None: ...

class GetOperationRequest(_message.Message):
    __slots__ = ("operation_id",)
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    def __init__(self, operation_id: _Optional[str] = ...) -> None: ...

class WatchOperationRequest(_message.Message):
    __slots__ = ("operation_id",)
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    def __init__(self, operation_id: _Optional[str] = ...) -> None: ...

class CancelOperationRequest(_message.Message):
    __slots__ = ("operation_id",)
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    operation_id: str
    def __init__(self, operation_id: _Optional[str] = ...) -> None: ...

class ListOperationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListOperationsResponse(_message.Message):
    __slots__ = ("operations",)
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    operations: _containers.RepeatedCompositeFieldContainer[Operation]
    def __init__(self, operations: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ...) -> None: ...
