import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_EXPIRED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_EXPIRED: JobState

class FileMetadata(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadBlobRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: FileMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[FileMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadBlobResponse(_message.Message):
    __slots__ = ("blob_id", "size")
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    blob_id: str
    size: int
    def __init__(self, blob_id: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class InputFile(_message.Message):
    __slots__ = ("path", "blob_id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    blob_id: str
    def __init__(self, path: _Optional[str] = ..., blob_id: _Optional[str] = ...) -> None: ...

class ModelInput(_message.Message):
    __slots__ = ("model_path", "files")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    files: _containers.RepeatedCompositeFieldContainer[InputFile]
    def __init__(self, model_path: _Optional[str] = ..., files: _Optional[_Iterable[_Union[InputFile, _Mapping]]] = ...) -> None: ...

class Shape(_message.Message):
    __slots__ = ("dims",)
    DIMS_FIELD_NUMBER: _ClassVar[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dims: _Optional[_Iterable[int]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("ratio", "criterion", "global_ranking", "target_macs", "target_params", "target_latency", "round_to", "exclude", "granularity", "sparsity", "depth", "shapes", "calib", "calib_samples", "reconstruct", "finetune_steps", "train_data", "lr", "batch_size", "iterations", "bench", "device", "seed", "fidelity_samples", "heads", "depth_method", "eval_data", "metric", "max_drop", "quantize", "quant_calibration", "quant_exclude", "keep_io_types", "quant_max_drop", "feature_distill", "prune_lm_hidden", "allocation")
    class ShapesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Shape
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Shape, _Mapping]] = ...) -> None: ...
    RATIO_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_RANKING_FIELD_NUMBER: _ClassVar[int]
    TARGET_MACS_FIELD_NUMBER: _ClassVar[int]
    TARGET_PARAMS_FIELD_NUMBER: _ClassVar[int]
    TARGET_LATENCY_FIELD_NUMBER: _ClassVar[int]
    ROUND_TO_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    SHAPES_FIELD_NUMBER: _ClassVar[int]
    CALIB_FIELD_NUMBER: _ClassVar[int]
    CALIB_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCT_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_DATA_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    BENCH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FIDELITY_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_METHOD_FIELD_NUMBER: _ClassVar[int]
    EVAL_DATA_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MAX_DROP_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    QUANT_CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    QUANT_EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    KEEP_IO_TYPES_FIELD_NUMBER: _ClassVar[int]
    QUANT_MAX_DROP_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DISTILL_FIELD_NUMBER: _ClassVar[int]
    PRUNE_LM_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    ratio: float
    criterion: str
    global_ranking: bool
    target_macs: float
    target_params: float
    target_latency: float
    round_to: int
    exclude: _containers.RepeatedScalarFieldContainer[str]
    granularity: str
    sparsity: float
    depth: int
    shapes: _containers.MessageMap[str, Shape]
    calib: str
    calib_samples: int
    reconstruct: bool
    finetune_steps: int
    train_data: str
    lr: float
    batch_size: int
    iterations: int
    bench: bool
    device: str
    seed: int
    fidelity_samples: int
    heads: str
    depth_method: str
    eval_data: str
    metric: str
    max_drop: float
    quantize: str
    quant_calibration: str
    quant_exclude: _containers.RepeatedScalarFieldContainer[str]
    keep_io_types: bool
    quant_max_drop: float
    feature_distill: bool
    prune_lm_hidden: bool
    allocation: str
    def __init__(self, ratio: _Optional[float] = ..., criterion: _Optional[str] = ..., global_ranking: _Optional[bool] = ..., target_macs: _Optional[float] = ..., target_params: _Optional[float] = ..., target_latency: _Optional[float] = ..., round_to: _Optional[int] = ..., exclude: _Optional[_Iterable[str]] = ..., granularity: _Optional[str] = ..., sparsity: _Optional[float] = ..., depth: _Optional[int] = ..., shapes: _Optional[_Mapping[str, Shape]] = ..., calib: _Optional[str] = ..., calib_samples: _Optional[int] = ..., reconstruct: _Optional[bool] = ..., finetune_steps: _Optional[int] = ..., train_data: _Optional[str] = ..., lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., iterations: _Optional[int] = ..., bench: _Optional[bool] = ..., device: _Optional[str] = ..., seed: _Optional[int] = ..., fidelity_samples: _Optional[int] = ..., heads: _Optional[str] = ..., depth_method: _Optional[str] = ..., eval_data: _Optional[str] = ..., metric: _Optional[str] = ..., max_drop: _Optional[float] = ..., quantize: _Optional[str] = ..., quant_calibration: _Optional[str] = ..., quant_exclude: _Optional[_Iterable[str]] = ..., keep_io_types: _Optional[bool] = ..., quant_max_drop: _Optional[float] = ..., feature_distill: _Optional[bool] = ..., prune_lm_hidden: _Optional[bool] = ..., allocation: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("model", "spec", "inputs", "output_name")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    model: ModelInput
    spec: JobSpec
    inputs: _containers.RepeatedCompositeFieldContainer[InputFile]
    output_name: str
    def __init__(self, model: _Optional[_Union[ModelInput, _Mapping]] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[InputFile, _Mapping]]] = ..., output_name: _Optional[str] = ...) -> None: ...

class SubmitJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "stage", "fraction", "message", "error", "error_type", "spec", "results", "create_time", "start_time", "end_time", "expire_time", "output_name")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    stage: str
    fraction: float
    message: str
    error: str
    error_type: str
    spec: JobSpec
    results: _containers.RepeatedCompositeFieldContainer[FileMetadata]
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    output_name: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., stage: _Optional[str] = ..., fraction: _Optional[float] = ..., message: _Optional[str] = ..., error: _Optional[str] = ..., error_type: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., results: _Optional[_Iterable[_Union[FileMetadata, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., output_name: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("job", "log_line")
    JOB_FIELD_NUMBER: _ClassVar[int]
    LOG_LINE_FIELD_NUMBER: _ClassVar[int]
    job: Job
    log_line: str
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., log_line: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class DownloadResultRequest(_message.Message):
    __slots__ = ("job_id", "name")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DownloadResultResponse(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: FileMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[FileMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("model", "shapes")
    class ShapesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Shape
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Shape, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHAPES_FIELD_NUMBER: _ClassVar[int]
    model: ModelInput
    shapes: _containers.MessageMap[str, Shape]
    def __init__(self, model: _Optional[_Union[ModelInput, _Mapping]] = ..., shapes: _Optional[_Mapping[str, Shape]] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("report_json",)
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    report_json: str
    def __init__(self, report_json: _Optional[str] = ...) -> None: ...
