from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtocolVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_VERSION_UNSPECIFIED: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_CURRENT: _ClassVar[ProtocolVersion]

class StageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_STATE_UNSPECIFIED: _ClassVar[StageState]
    PENDING: _ClassVar[StageState]
    READY: _ClassVar[StageState]
    ASSIGNED: _ClassVar[StageState]
    RUNNING: _ClassVar[StageState]
    SUCCEEDED: _ClassVar[StageState]
    FAILED: _ClassVar[StageState]
    CANCELLED: _ClassVar[StageState]

class FailureClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_CLASS_UNSPECIFIED: _ClassVar[FailureClass]
    FAILURE_NODE_LOST: _ClassVar[FailureClass]
    FAILURE_PREEMPTED: _ClassVar[FailureClass]
    FAILURE_CANCELLED: _ClassVar[FailureClass]
    FAILURE_ERROR: _ClassVar[FailureClass]
    FAILURE_INFRA: _ClassVar[FailureClass]
PROTOCOL_VERSION_UNSPECIFIED: ProtocolVersion
PROTOCOL_VERSION_CURRENT: ProtocolVersion
STAGE_STATE_UNSPECIFIED: StageState
PENDING: StageState
READY: StageState
ASSIGNED: StageState
RUNNING: StageState
SUCCEEDED: StageState
FAILED: StageState
CANCELLED: StageState
FAILURE_CLASS_UNSPECIFIED: FailureClass
FAILURE_NODE_LOST: FailureClass
FAILURE_PREEMPTED: FailureClass
FAILURE_CANCELLED: FailureClass
FAILURE_ERROR: FailureClass
FAILURE_INFRA: FailureClass

class Resources(_message.Message):
    __slots__ = ("gpus", "cpus", "memory_mib", "processes", "nodes")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    gpus: int
    cpus: float
    memory_mib: int
    processes: int
    nodes: int
    def __init__(self, gpus: _Optional[int] = ..., cpus: _Optional[float] = ..., memory_mib: _Optional[int] = ..., processes: _Optional[int] = ..., nodes: _Optional[int] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "uuid", "name", "memory_mib", "driver_version")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    memory_mib: int
    driver_version: str
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., memory_mib: _Optional[int] = ..., driver_version: _Optional[str] = ...) -> None: ...

class GpuUsage(_message.Message):
    __slots__ = ("index", "utilization_percent", "memory_used_mib", "memory_total_mib")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_MIB_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_MIB_FIELD_NUMBER: _ClassVar[int]
    index: int
    utilization_percent: float
    memory_used_mib: int
    memory_total_mib: int
    def __init__(self, index: _Optional[int] = ..., utilization_percent: _Optional[float] = ..., memory_used_mib: _Optional[int] = ..., memory_total_mib: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("cpu_percent", "memory_used_mib", "memory_total_mib", "gpus", "disk_free_mib")
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_MIB_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_MIB_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_MIB_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    memory_used_mib: int
    memory_total_mib: int
    gpus: _containers.RepeatedCompositeFieldContainer[GpuUsage]
    disk_free_mib: int
    def __init__(self, cpu_percent: _Optional[float] = ..., memory_used_mib: _Optional[int] = ..., memory_total_mib: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[GpuUsage, _Mapping]]] = ..., disk_free_mib: _Optional[int] = ...) -> None: ...

class NodeFacts(_message.Message):
    __slots__ = ("hostname", "name", "gpus", "cpu_count", "memory_mib", "disk_free_mib", "software", "extras", "stage_kinds", "nvml", "workdir", "warnings", "advertise_address")
    class SoftwareEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_MIB_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    STAGE_KINDS_FIELD_NUMBER: _ClassVar[int]
    NVML_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    name: str
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    cpu_count: int
    memory_mib: int
    disk_free_mib: int
    software: _containers.ScalarMap[str, str]
    extras: _containers.RepeatedScalarFieldContainer[str]
    stage_kinds: _containers.RepeatedScalarFieldContainer[str]
    nvml: str
    workdir: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    advertise_address: str
    def __init__(self, hostname: _Optional[str] = ..., name: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., cpu_count: _Optional[int] = ..., memory_mib: _Optional[int] = ..., disk_free_mib: _Optional[int] = ..., software: _Optional[_Mapping[str, str]] = ..., extras: _Optional[_Iterable[str]] = ..., stage_kinds: _Optional[_Iterable[str]] = ..., nvml: _Optional[str] = ..., workdir: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ..., advertise_address: _Optional[str] = ...) -> None: ...

class RunningAttempt(_message.Message):
    __slots__ = ("attempt_id", "lease_token")
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    attempt_id: int
    lease_token: str
    def __init__(self, attempt_id: _Optional[int] = ..., lease_token: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("protocol_version", "node_id", "facts", "running")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    facts: NodeFacts
    running: _containers.RepeatedCompositeFieldContainer[RunningAttempt]
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., facts: _Optional[_Union[NodeFacts, _Mapping]] = ..., running: _Optional[_Iterable[_Union[RunningAttempt, _Mapping]]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("protocol_version", "node_id", "session", "heartbeat_interval_s", "lost_timeout_s")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LOST_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    session: int
    heartbeat_interval_s: float
    lost_timeout_s: float
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., session: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., lost_timeout_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "session", "usage", "running", "unavailable", "seq")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session: int
    usage: Usage
    running: _containers.RepeatedCompositeFieldContainer[RunningAttempt]
    unavailable: str
    seq: int
    def __init__(self, node_id: _Optional[str] = ..., session: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., running: _Optional[_Iterable[_Union[RunningAttempt, _Mapping]]] = ..., unavailable: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("reregister", "revoked", "seq")
    REREGISTER_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    reregister: bool
    revoked: _containers.RepeatedScalarFieldContainer[int]
    seq: int
    def __init__(self, reregister: _Optional[bool] = ..., revoked: _Optional[_Iterable[int]] = ..., seq: _Optional[int] = ...) -> None: ...

class AssignmentStreamRequest(_message.Message):
    __slots__ = ("node_id", "session")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session: int
    def __init__(self, node_id: _Optional[str] = ..., session: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("attempt_id", "lease_token", "attempt", "stage_id", "experiment", "stage", "kind", "params_json", "smoke", "resources", "gpu_indices", "plan_json", "rendezvous")
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    SMOKE_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    attempt_id: int
    lease_token: str
    attempt: int
    stage_id: int
    experiment: str
    stage: str
    kind: str
    params_json: str
    smoke: bool
    resources: Resources
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    plan_json: str
    rendezvous: Rendezvous
    def __init__(self, attempt_id: _Optional[int] = ..., lease_token: _Optional[str] = ..., attempt: _Optional[int] = ..., stage_id: _Optional[int] = ..., experiment: _Optional[str] = ..., stage: _Optional[str] = ..., kind: _Optional[str] = ..., params_json: _Optional[str] = ..., smoke: _Optional[bool] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., plan_json: _Optional[str] = ..., rendezvous: _Optional[_Union[Rendezvous, _Mapping]] = ...) -> None: ...

class Rendezvous(_message.Message):
    __slots__ = ("endpoint", "nnodes", "node_rank", "run_id")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    NNODES_FIELD_NUMBER: _ClassVar[int]
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    nnodes: int
    node_rank: int
    run_id: str
    def __init__(self, endpoint: _Optional[str] = ..., nnodes: _Optional[int] = ..., node_rank: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class CancelAttempt(_message.Message):
    __slots__ = ("attempt_id", "lease_token", "reason")
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    attempt_id: int
    lease_token: str
    reason: str
    def __init__(self, attempt_id: _Optional[int] = ..., lease_token: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class FetchArtifact(_message.Message):
    __slots__ = ("transfer_id", "experiment", "path", "offset", "max_bytes", "stat")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAT_FIELD_NUMBER: _ClassVar[int]
    transfer_id: int
    experiment: str
    path: str
    offset: int
    max_bytes: int
    stat: bool
    def __init__(self, transfer_id: _Optional[int] = ..., experiment: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ..., max_bytes: _Optional[int] = ..., stat: _Optional[bool] = ...) -> None: ...

class NodeCommand(_message.Message):
    __slots__ = ("assign", "cancel", "fetch")
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    assign: Assignment
    cancel: CancelAttempt
    fetch: FetchArtifact
    def __init__(self, assign: _Optional[_Union[Assignment, _Mapping]] = ..., cancel: _Optional[_Union[CancelAttempt, _Mapping]] = ..., fetch: _Optional[_Union[FetchArtifact, _Mapping]] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("stream", "text")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    stream: str
    text: str
    def __init__(self, stream: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Metric(_message.Message):
    __slots__ = ("step", "values", "null_values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NULL_VALUES_FIELD_NUMBER: _ClassVar[int]
    step: int
    values: _containers.ScalarMap[str, float]
    null_values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., values: _Optional[_Mapping[str, float]] = ..., null_values: _Optional[_Iterable[str]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("path", "kind")
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    path: str
    kind: str
    def __init__(self, path: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("what", "done", "total", "has_total")
    WHAT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    HAS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    what: str
    done: int
    total: int
    has_total: bool
    def __init__(self, what: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., has_total: _Optional[bool] = ...) -> None: ...

class Dropped(_message.Message):
    __slots__ = ("count", "logs", "metrics", "progress", "first_seq", "last_seq", "reason")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    count: int
    logs: int
    metrics: int
    progress: int
    first_seq: int
    last_seq: int
    reason: str
    def __init__(self, count: _Optional[int] = ..., logs: _Optional[int] = ..., metrics: _Optional[int] = ..., progress: _Optional[int] = ..., first_seq: _Optional[int] = ..., last_seq: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("attempt_id", "lease_token", "seq", "time", "log", "metric", "artifact", "progress", "dropped")
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    attempt_id: int
    lease_token: str
    seq: int
    time: float
    log: LogLine
    metric: Metric
    artifact: Artifact
    progress: Progress
    dropped: Dropped
    def __init__(self, attempt_id: _Optional[int] = ..., lease_token: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[float] = ..., log: _Optional[_Union[LogLine, _Mapping]] = ..., metric: _Optional[_Union[Metric, _Mapping]] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., dropped: _Optional[_Union[Dropped, _Mapping]] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("node_id", "events")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, node_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class EventAck(_message.Message):
    __slots__ = ("stored", "rejected_attempts")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    stored: int
    rejected_attempts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, stored: _Optional[int] = ..., rejected_attempts: _Optional[_Iterable[int]] = ...) -> None: ...

class StageStatusReport(_message.Message):
    __slots__ = ("node_id", "attempt_id", "lease_token", "state", "exit_code", "message", "last_seq", "failure_class")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    FAILURE_CLASS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    attempt_id: int
    lease_token: str
    state: StageState
    exit_code: int
    message: str
    last_seq: int
    failure_class: FailureClass
    def __init__(self, node_id: _Optional[str] = ..., attempt_id: _Optional[int] = ..., lease_token: _Optional[str] = ..., state: _Optional[_Union[StageState, str]] = ..., exit_code: _Optional[int] = ..., message: _Optional[str] = ..., last_seq: _Optional[int] = ..., failure_class: _Optional[_Union[FailureClass, str]] = ...) -> None: ...

class StageStatusAck(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("node_id", "session", "transfer_id", "offset", "data", "size", "error", "last", "sha256", "error_kind")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session: int
    transfer_id: int
    offset: int
    data: bytes
    size: int
    error: str
    last: bool
    sha256: str
    error_kind: str
    def __init__(self, node_id: _Optional[str] = ..., session: _Optional[int] = ..., transfer_id: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ..., error: _Optional[str] = ..., last: _Optional[bool] = ..., sha256: _Optional[str] = ..., error_kind: _Optional[str] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class PlanError(_message.Message):
    __slots__ = ("path", "message")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    path: str
    message: str
    def __init__(self, path: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("plan_json",)
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    plan_json: str
    def __init__(self, plan_json: _Optional[str] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("experiment", "errors")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    errors: _containers.RepeatedCompositeFieldContainer[PlanError]
    def __init__(self, experiment: _Optional[str] = ..., errors: _Optional[_Iterable[_Union[PlanError, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("experiment", "limit")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    limit: int
    def __init__(self, experiment: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "facts", "online", "heartbeat_age_s", "usage", "allocated", "allocated_gpus", "state", "unavailable", "drained", "drain_deadline")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_GPUS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    DRAIN_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    facts: NodeFacts
    online: bool
    heartbeat_age_s: float
    usage: Usage
    allocated: Resources
    allocated_gpus: _containers.RepeatedScalarFieldContainer[int]
    state: str
    unavailable: str
    drained: bool
    drain_deadline: float
    def __init__(self, node_id: _Optional[str] = ..., facts: _Optional[_Union[NodeFacts, _Mapping]] = ..., online: _Optional[bool] = ..., heartbeat_age_s: _Optional[float] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., allocated: _Optional[_Union[Resources, _Mapping]] = ..., allocated_gpus: _Optional[_Iterable[int]] = ..., state: _Optional[str] = ..., unavailable: _Optional[str] = ..., drained: _Optional[bool] = ..., drain_deadline: _Optional[float] = ...) -> None: ...

class Transition(_message.Message):
    __slots__ = ("from_state", "to_state", "time", "reason")
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    from_state: StageState
    to_state: StageState
    time: float
    reason: str
    def __init__(self, from_state: _Optional[_Union[StageState, str]] = ..., to_state: _Optional[_Union[StageState, str]] = ..., time: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class AttemptStatus(_message.Message):
    __slots__ = ("attempt_id", "number", "node_id", "node_name", "state", "exit_code", "message", "gpu_indices", "assigned_at", "started_at", "finished_at", "failure_class", "rank")
    ATTEMPT_ID_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_CLASS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    attempt_id: int
    number: int
    node_id: str
    node_name: str
    state: StageState
    exit_code: int
    message: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    assigned_at: float
    started_at: float
    finished_at: float
    failure_class: str
    rank: int
    def __init__(self, attempt_id: _Optional[int] = ..., number: _Optional[int] = ..., node_id: _Optional[str] = ..., node_name: _Optional[str] = ..., state: _Optional[_Union[StageState, str]] = ..., exit_code: _Optional[int] = ..., message: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., assigned_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., failure_class: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("stage_id", "name", "kind", "state", "after", "resources", "reason", "attempts", "transitions", "max_retries", "progress")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    stage_id: int
    name: str
    kind: str
    state: StageState
    after: _containers.RepeatedScalarFieldContainer[str]
    resources: Resources
    reason: str
    attempts: _containers.RepeatedCompositeFieldContainer[AttemptStatus]
    transitions: _containers.RepeatedCompositeFieldContainer[Transition]
    max_retries: int
    progress: _containers.RepeatedCompositeFieldContainer[Progress]
    def __init__(self, stage_id: _Optional[int] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[StageState, str]] = ..., after: _Optional[_Iterable[str]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., reason: _Optional[str] = ..., attempts: _Optional[_Iterable[_Union[AttemptStatus, _Mapping]]] = ..., transitions: _Optional[_Iterable[_Union[Transition, _Mapping]]] = ..., max_retries: _Optional[int] = ..., progress: _Optional[_Iterable[_Union[Progress, _Mapping]]] = ...) -> None: ...

class ExperimentStatus(_message.Message):
    __slots__ = ("experiment", "name", "state", "priority", "created_at", "finished_at", "stages", "shared_workdir", "smoke", "owner")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    SHARED_WORKDIR_FIELD_NUMBER: _ClassVar[int]
    SMOKE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    name: str
    state: str
    priority: int
    created_at: float
    finished_at: float
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    shared_workdir: bool
    smoke: bool
    owner: str
    def __init__(self, experiment: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., priority: _Optional[int] = ..., created_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ..., shared_workdir: _Optional[bool] = ..., smoke: _Optional[bool] = ..., owner: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("nodes", "experiments")
    NODES_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    experiments: _containers.RepeatedCompositeFieldContainer[ExperimentStatus]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., experiments: _Optional[_Iterable[_Union[ExperimentStatus, _Mapping]]] = ...) -> None: ...

class StageRef(_message.Message):
    __slots__ = ("experiment", "stage", "stage_id")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    stage: str
    stage_id: int
    def __init__(self, experiment: _Optional[str] = ..., stage: _Optional[str] = ..., stage_id: _Optional[int] = ...) -> None: ...

class LogsRequest(_message.Message):
    __slots__ = ("stage", "attempt", "follow", "after_seq", "member")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    stage: StageRef
    attempt: int
    follow: bool
    after_seq: int
    member: int
    def __init__(self, stage: _Optional[_Union[StageRef, _Mapping]] = ..., attempt: _Optional[int] = ..., follow: _Optional[bool] = ..., after_seq: _Optional[int] = ..., member: _Optional[int] = ...) -> None: ...

class LogRecord(_message.Message):
    __slots__ = ("attempt", "seq", "time", "stream", "text")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    seq: int
    time: float
    stream: str
    text: str
    def __init__(self, attempt: _Optional[int] = ..., seq: _Optional[int] = ..., time: _Optional[float] = ..., stream: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ("stage", "attempt", "page_size", "after_attempt", "after_seq", "member")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    AFTER_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    stage: StageRef
    attempt: int
    page_size: int
    after_attempt: int
    after_seq: int
    member: int
    def __init__(self, stage: _Optional[_Union[StageRef, _Mapping]] = ..., attempt: _Optional[int] = ..., page_size: _Optional[int] = ..., after_attempt: _Optional[int] = ..., after_seq: _Optional[int] = ..., member: _Optional[int] = ...) -> None: ...

class MetricRecord(_message.Message):
    __slots__ = ("attempt", "seq", "time", "metric")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    seq: int
    time: float
    metric: Metric
    def __init__(self, attempt: _Optional[int] = ..., seq: _Optional[int] = ..., time: _Optional[float] = ..., metric: _Optional[_Union[Metric, _Mapping]] = ...) -> None: ...

class MetricsResponse(_message.Message):
    __slots__ = ("metrics", "more")
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.RepeatedCompositeFieldContainer[MetricRecord]
    more: bool
    def __init__(self, metrics: _Optional[_Iterable[_Union[MetricRecord, _Mapping]]] = ..., more: _Optional[bool] = ...) -> None: ...

class ArtifactsRequest(_message.Message):
    __slots__ = ("experiment",)
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    def __init__(self, experiment: _Optional[str] = ...) -> None: ...

class ArtifactRecord(_message.Message):
    __slots__ = ("stage", "attempt", "node_id", "node_name", "time", "artifact")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    stage: str
    attempt: int
    node_id: str
    node_name: str
    time: float
    artifact: Artifact
    def __init__(self, stage: _Optional[str] = ..., attempt: _Optional[int] = ..., node_id: _Optional[str] = ..., node_name: _Optional[str] = ..., time: _Optional[float] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ...) -> None: ...

class ArtifactsResponse(_message.Message):
    __slots__ = ("artifacts",)
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[ArtifactRecord]
    def __init__(self, artifacts: _Optional[_Iterable[_Union[ArtifactRecord, _Mapping]]] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("experiment", "path", "offset", "stat")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    STAT_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    path: str
    offset: int
    stat: bool
    def __init__(self, experiment: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ..., stat: _Optional[bool] = ...) -> None: ...

class ArtifactData(_message.Message):
    __slots__ = ("offset", "data", "size", "last", "sha256", "node_id")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    size: int
    last: bool
    sha256: str
    node_id: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ..., last: _Optional[bool] = ..., sha256: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("experiment", "reason")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    reason: str
    def __init__(self, experiment: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled", "signalled", "finished")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    SIGNALLED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    cancelled: int
    signalled: int
    finished: str
    def __init__(self, cancelled: _Optional[int] = ..., signalled: _Optional[int] = ..., finished: _Optional[str] = ...) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("node", "undrain", "deadline_s")
    NODE_FIELD_NUMBER: _ClassVar[int]
    UNDRAIN_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    node: str
    undrain: bool
    deadline_s: float
    def __init__(self, node: _Optional[str] = ..., undrain: _Optional[bool] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class DrainNodeResponse(_message.Message):
    __slots__ = ("node", "running")
    NODE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    node: NodeStatus
    running: int
    def __init__(self, node: _Optional[_Union[NodeStatus, _Mapping]] = ..., running: _Optional[int] = ...) -> None: ...

class RerunRequest(_message.Message):
    __slots__ = ("experiment", "stage")
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    experiment: str
    stage: str
    def __init__(self, experiment: _Optional[str] = ..., stage: _Optional[str] = ...) -> None: ...

class RerunResponse(_message.Message):
    __slots__ = ("stages",)
    STAGES_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stages: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("id", "user", "role", "created_at", "revoked")
    ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    id: int
    user: str
    role: str
    created_at: float
    revoked: bool
    def __init__(self, id: _Optional[int] = ..., user: _Optional[str] = ..., role: _Optional[str] = ..., created_at: _Optional[float] = ..., revoked: _Optional[bool] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("user", "role")
    USER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    user: str
    role: str
    def __init__(self, user: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "info")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    token: str
    info: TokenInfo
    def __init__(self, token: _Optional[str] = ..., info: _Optional[_Union[TokenInfo, _Mapping]] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    def __init__(self, revoked: _Optional[bool] = ...) -> None: ...
