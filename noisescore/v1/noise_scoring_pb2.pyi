import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CorrectionView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CORRECTION_VIEW_UNSPECIFIED: _ClassVar[CorrectionView]
    CORRECTION_VIEW_BASIC: _ClassVar[CorrectionView]
    CORRECTION_VIEW_FULL: _ClassVar[CorrectionView]
CORRECTION_VIEW_UNSPECIFIED: CorrectionView
CORRECTION_VIEW_BASIC: CorrectionView
CORRECTION_VIEW_FULL: CorrectionView

class CleaningJobSpec(_message.Message):
    __slots__ = ("dataset_uri", "model", "epochs", "warmup_epochs", "alpha_lr", "alpha_wd", "seed", "noise", "idempotency_key", "device", "detectors", "flag_by", "cl_folds")
    DATASET_URI_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    ALPHA_LR_FIELD_NUMBER: _ClassVar[int]
    ALPHA_WD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    FLAG_BY_FIELD_NUMBER: _ClassVar[int]
    CL_FOLDS_FIELD_NUMBER: _ClassVar[int]
    dataset_uri: str
    model: str
    epochs: int
    warmup_epochs: int
    alpha_lr: float
    alpha_wd: float
    seed: int
    noise: NoiseInjection
    idempotency_key: str
    device: str
    detectors: _containers.RepeatedScalarFieldContainer[str]
    flag_by: str
    cl_folds: int
    def __init__(self, dataset_uri: _Optional[str] = ..., model: _Optional[str] = ..., epochs: _Optional[int] = ..., warmup_epochs: _Optional[int] = ..., alpha_lr: _Optional[float] = ..., alpha_wd: _Optional[float] = ..., seed: _Optional[int] = ..., noise: _Optional[_Union[NoiseInjection, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., device: _Optional[str] = ..., detectors: _Optional[_Iterable[str]] = ..., flag_by: _Optional[str] = ..., cl_folds: _Optional[int] = ...) -> None: ...

class NoiseInjection(_message.Message):
    __slots__ = ("kind", "rate")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    rate: float
    def __init__(self, kind: _Optional[str] = ..., rate: _Optional[float] = ...) -> None: ...

class SubmitCleaningJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: CleaningJobSpec
    def __init__(self, spec: _Optional[_Union[CleaningJobSpec, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("name", "state", "spec", "create_time", "start_time", "end_time", "error", "result", "artifacts_uri", "progress", "active_spec", "waiting_round", "active_result")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        QUEUED: _ClassVar[Job.State]
        RUNNING: _ClassVar[Job.State]
        SUCCEEDED: _ClassVar[Job.State]
        FAILED: _ClassVar[Job.State]
        CANCELLED: _ClassVar[Job.State]
        WAITING_FOR_LABELS: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    QUEUED: Job.State
    RUNNING: Job.State
    SUCCEEDED: Job.State
    FAILED: Job.State
    CANCELLED: Job.State
    WAITING_FOR_LABELS: Job.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_URI_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SPEC_FIELD_NUMBER: _ClassVar[int]
    WAITING_ROUND_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_RESULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: Job.State
    spec: CleaningJobSpec
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    error: str
    result: JobResult
    artifacts_uri: str
    progress: JobEvent
    active_spec: ActiveCleaningJobSpec
    waiting_round: int
    active_result: ActiveJobResult
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ..., spec: _Optional[_Union[CleaningJobSpec, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ..., artifacts_uri: _Optional[str] = ..., progress: _Optional[_Union[JobEvent, _Mapping]] = ..., active_spec: _Optional[_Union[ActiveCleaningJobSpec, _Mapping]] = ..., waiting_round: _Optional[int] = ..., active_result: _Optional[_Union[ActiveJobResult, _Mapping]] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("n_train", "n_classes", "otsu_threshold", "n_flagged", "n_changed", "trust_mean", "test_accuracy", "test_macro_f1", "detection_auroc", "label_accuracy_before", "label_accuracy_after", "suspect_cutoff", "detectors", "flagged_by", "correction_skipped", "bimodality", "bimodality_min", "detector_auroc")
    class DetectorAurocEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    N_TRAIN_FIELD_NUMBER: _ClassVar[int]
    N_CLASSES_FIELD_NUMBER: _ClassVar[int]
    OTSU_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    N_FLAGGED_FIELD_NUMBER: _ClassVar[int]
    N_CHANGED_FIELD_NUMBER: _ClassVar[int]
    TRUST_MEAN_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    DETECTION_AUROC_FIELD_NUMBER: _ClassVar[int]
    LABEL_ACCURACY_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_ACCURACY_AFTER_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_CUTOFF_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_BY_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    BIMODALITY_FIELD_NUMBER: _ClassVar[int]
    BIMODALITY_MIN_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_AUROC_FIELD_NUMBER: _ClassVar[int]
    n_train: int
    n_classes: int
    otsu_threshold: float
    n_flagged: int
    n_changed: int
    trust_mean: float
    test_accuracy: float
    test_macro_f1: float
    detection_auroc: float
    label_accuracy_before: float
    label_accuracy_after: float
    suspect_cutoff: float
    detectors: _containers.RepeatedScalarFieldContainer[str]
    flagged_by: str
    correction_skipped: bool
    bimodality: float
    bimodality_min: float
    detector_auroc: _containers.ScalarMap[str, float]
    def __init__(self, n_train: _Optional[int] = ..., n_classes: _Optional[int] = ..., otsu_threshold: _Optional[float] = ..., n_flagged: _Optional[int] = ..., n_changed: _Optional[int] = ..., trust_mean: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., test_macro_f1: _Optional[float] = ..., detection_auroc: _Optional[float] = ..., label_accuracy_before: _Optional[float] = ..., label_accuracy_after: _Optional[float] = ..., suspect_cutoff: _Optional[float] = ..., detectors: _Optional[_Iterable[str]] = ..., flagged_by: _Optional[str] = ..., correction_skipped: _Optional[bool] = ..., bimodality: _Optional[float] = ..., bimodality_min: _Optional[float] = ..., detector_auroc: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ActiveCleaningJobSpec(_message.Message):
    __slots__ = ("dataset_uri", "model", "seed", "noise", "imbalance", "lnl_method", "epochs", "forget_rate", "mix_ratio", "vog_mode", "clean_epochs", "sampler", "rounds", "budget", "fine_tune_epochs", "expert", "idempotency_key", "device")
    DATASET_URI_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    IMBALANCE_FIELD_NUMBER: _ClassVar[int]
    LNL_METHOD_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    FORGET_RATE_FIELD_NUMBER: _ClassVar[int]
    MIX_RATIO_FIELD_NUMBER: _ClassVar[int]
    VOG_MODE_FIELD_NUMBER: _ClassVar[int]
    CLEAN_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNE_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    dataset_uri: str
    model: str
    seed: int
    noise: NoiseInjection
    imbalance: float
    lnl_method: str
    epochs: int
    forget_rate: float
    mix_ratio: float
    vog_mode: str
    clean_epochs: int
    sampler: str
    rounds: int
    budget: int
    fine_tune_epochs: int
    expert: str
    idempotency_key: str
    device: str
    def __init__(self, dataset_uri: _Optional[str] = ..., model: _Optional[str] = ..., seed: _Optional[int] = ..., noise: _Optional[_Union[NoiseInjection, _Mapping]] = ..., imbalance: _Optional[float] = ..., lnl_method: _Optional[str] = ..., epochs: _Optional[int] = ..., forget_rate: _Optional[float] = ..., mix_ratio: _Optional[float] = ..., vog_mode: _Optional[str] = ..., clean_epochs: _Optional[int] = ..., sampler: _Optional[str] = ..., rounds: _Optional[int] = ..., budget: _Optional[int] = ..., fine_tune_epochs: _Optional[int] = ..., expert: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class SubmitActiveCleaningJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: ActiveCleaningJobSpec
    def __init__(self, spec: _Optional[_Union[ActiveCleaningJobSpec, _Mapping]] = ...) -> None: ...

class ActiveJobResult(_message.Message):
    __slots__ = ("n_train", "n_classes", "n_clean", "n_relabelled", "rounds", "test_macro_f1", "test_accuracy")
    N_TRAIN_FIELD_NUMBER: _ClassVar[int]
    N_CLASSES_FIELD_NUMBER: _ClassVar[int]
    N_CLEAN_FIELD_NUMBER: _ClassVar[int]
    N_RELABELLED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TEST_MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    n_train: int
    n_classes: int
    n_clean: int
    n_relabelled: int
    rounds: int
    test_macro_f1: float
    test_accuracy: float
    def __init__(self, n_train: _Optional[int] = ..., n_classes: _Optional[int] = ..., n_clean: _Optional[int] = ..., n_relabelled: _Optional[int] = ..., rounds: _Optional[int] = ..., test_macro_f1: _Optional[float] = ..., test_accuracy: _Optional[float] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: Job.State
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("name", "state", "stage", "epoch", "epochs", "loss", "trust_mean", "flagged_fraction", "time", "waiting_round")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TRUST_MEAN_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    WAITING_ROUND_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: Job.State
    stage: str
    epoch: int
    epochs: int
    loss: float
    trust_mean: float
    flagged_fraction: float
    time: _timestamp_pb2.Timestamp
    waiting_round: int
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ..., stage: _Optional[str] = ..., epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., loss: _Optional[float] = ..., trust_mean: _Optional[float] = ..., flagged_fraction: _Optional[float] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., waiting_round: _Optional[int] = ...) -> None: ...

class GetCorrectionsRequest(_message.Message):
    __slots__ = ("job", "page_size", "page_token", "only_flagged", "view")
    JOB_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ONLY_FLAGGED_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    job: str
    page_size: int
    page_token: str
    only_flagged: bool
    view: CorrectionView
    def __init__(self, job: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., only_flagged: _Optional[bool] = ..., view: _Optional[_Union[CorrectionView, str]] = ...) -> None: ...

class StreamCorrectionsRequest(_message.Message):
    __slots__ = ("job", "only_flagged", "chunk_size", "view")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ONLY_FLAGGED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    job: str
    only_flagged: bool
    chunk_size: int
    view: CorrectionView
    def __init__(self, job: _Optional[str] = ..., only_flagged: _Optional[bool] = ..., chunk_size: _Optional[int] = ..., view: _Optional[_Union[CorrectionView, str]] = ...) -> None: ...

class Correction(_message.Message):
    __slots__ = ("index", "sample_id", "observed_label", "trust", "flagged", "corrected_label", "detector_scores", "source")
    class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SOURCE_UNSPECIFIED: _ClassVar[Correction.Source]
        OBSERVED: _ClassVar[Correction.Source]
        MODEL: _ClassVar[Correction.Source]
        EXPERT: _ClassVar[Correction.Source]
    SOURCE_UNSPECIFIED: Correction.Source
    OBSERVED: Correction.Source
    MODEL: Correction.Source
    EXPERT: Correction.Source
    class DetectorScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_LABEL_FIELD_NUMBER: _ClassVar[int]
    TRUST_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    CORRECTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_SCORES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    index: int
    sample_id: str
    observed_label: int
    trust: float
    flagged: bool
    corrected_label: int
    detector_scores: _containers.ScalarMap[str, float]
    source: Correction.Source
    def __init__(self, index: _Optional[int] = ..., sample_id: _Optional[str] = ..., observed_label: _Optional[int] = ..., trust: _Optional[float] = ..., flagged: _Optional[bool] = ..., corrected_label: _Optional[int] = ..., detector_scores: _Optional[_Mapping[str, float]] = ..., source: _Optional[_Union[Correction.Source, str]] = ...) -> None: ...

class GetCorrectionsResponse(_message.Message):
    __slots__ = ("corrections", "next_page_token", "total_size")
    CORRECTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    corrections: _containers.RepeatedCompositeFieldContainer[Correction]
    next_page_token: str
    total_size: int
    def __init__(self, corrections: _Optional[_Iterable[_Union[Correction, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LabelledSample(_message.Message):
    __slots__ = ("image", "label", "sample_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    image: Image
    label: int
    sample_id: str
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., label: _Optional[int] = ..., sample_id: _Optional[str] = ...) -> None: ...

class ScoreLabelsRequest(_message.Message):
    __slots__ = ("job", "samples")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    job: str
    samples: _containers.RepeatedCompositeFieldContainer[LabelledSample]
    def __init__(self, job: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[LabelledSample, _Mapping]]] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("sample_id", "label", "label_quality", "normalized_margin", "predicted_label", "suspect")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LABEL_QUALITY_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_MARGIN_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    label: int
    label_quality: float
    normalized_margin: float
    predicted_label: int
    suspect: bool
    def __init__(self, sample_id: _Optional[str] = ..., label: _Optional[int] = ..., label_quality: _Optional[float] = ..., normalized_margin: _Optional[float] = ..., predicted_label: _Optional[int] = ..., suspect: _Optional[bool] = ...) -> None: ...

class ScoreLabelsResponse(_message.Message):
    __slots__ = ("scores", "suspect_cutoff")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_CUTOFF_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[LabelScore]
    suspect_cutoff: float
    def __init__(self, scores: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., suspect_cutoff: _Optional[float] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("job", "images")
    JOB_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    job: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, job: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("probabilities", "predicted_label")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    predicted_label: int
    def __init__(self, probabilities: _Optional[_Iterable[float]] = ..., predicted_label: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions",)
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class GetRelabelQueueRequest(_message.Message):
    __slots__ = ("job", "round", "skip_images")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SKIP_IMAGES_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    skip_images: bool
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., skip_images: _Optional[bool] = ...) -> None: ...

class RelabelQueue(_message.Message):
    __slots__ = ("job", "round", "closed", "items", "n_classes", "class_names", "n_answered")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    N_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    N_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    closed: bool
    items: _containers.RepeatedCompositeFieldContainer[RelabelItem]
    n_classes: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    n_answered: int
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., closed: _Optional[bool] = ..., items: _Optional[_Iterable[_Union[RelabelItem, _Mapping]]] = ..., n_classes: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., n_answered: _Optional[int] = ...) -> None: ...

class RelabelItem(_message.Message):
    __slots__ = ("index", "sample_id", "current_label", "predicted_label", "probabilities", "png", "priority", "answered_label")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LABEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_LABEL_FIELD_NUMBER: _ClassVar[int]
    index: int
    sample_id: str
    current_label: int
    predicted_label: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    png: bytes
    priority: float
    answered_label: int
    def __init__(self, index: _Optional[int] = ..., sample_id: _Optional[str] = ..., current_label: _Optional[int] = ..., predicted_label: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ..., png: _Optional[bytes] = ..., priority: _Optional[float] = ..., answered_label: _Optional[int] = ...) -> None: ...

class Relabel(_message.Message):
    __slots__ = ("sample_id", "label", "annotator")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    label: int
    annotator: str
    def __init__(self, sample_id: _Optional[str] = ..., label: _Optional[int] = ..., annotator: _Optional[str] = ...) -> None: ...

class SubmitRelabelsRequest(_message.Message):
    __slots__ = ("job", "round", "relabels", "close_round")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RELABELS_FIELD_NUMBER: _ClassVar[int]
    CLOSE_ROUND_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    relabels: _containers.RepeatedCompositeFieldContainer[Relabel]
    close_round: bool
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., relabels: _Optional[_Iterable[_Union[Relabel, _Mapping]]] = ..., close_round: _Optional[bool] = ...) -> None: ...

class SubmitRelabelsResponse(_message.Message):
    __slots__ = ("results", "round_closed", "n_answered", "n_queued")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ROUND_CLOSED_FIELD_NUMBER: _ClassVar[int]
    N_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    N_QUEUED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RelabelResult]
    round_closed: bool
    n_answered: int
    n_queued: int
    def __init__(self, results: _Optional[_Iterable[_Union[RelabelResult, _Mapping]]] = ..., round_closed: _Optional[bool] = ..., n_answered: _Optional[int] = ..., n_queued: _Optional[int] = ...) -> None: ...

class RelabelResult(_message.Message):
    __slots__ = ("sample_id", "accepted", "reason")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    accepted: bool
    reason: str
    def __init__(self, sample_id: _Optional[str] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
