"""Typed settings shared by the CLI, the flows and the service.

Values come from (highest first) explicit arguments/flags, ``NOISESCORE_*`` environment
variables, then the defaults below (the LiNC paper's, where the paper gives one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from noisescore.ml.detector_names import (
    DETECTOR_NAMES,
    ETA_MIN,
    check_flag_by,
    parse_detectors,
)
from noisescore.ml.method_names import (
    BENCH_METHODS,
    SAMPLER_NAMES,
    SELECTION_METHODS,
    check_choice,
    check_method_name,
)
from noisescore.ml.model_names import DEFAULT_MODEL, check_model_name
from noisescore.ml.noise import parse_noise_spec


def _dataset_roots(value: Any) -> Any:
    """``NOISESCORE_DATASET_ROOTS`` / ``--dataset-roots``: a comma-separated or JSON list."""
    if value is None:
        return None
    from noisescore.uris import parse_dataset_roots  # lazily: it imports numpy/PIL

    return parse_dataset_roots(value)


class _EnvWithout(EnvSettingsSource):
    """The ``NOISESCORE_*`` environment minus fields that only an explicit value may set."""

    def __init__(self, settings_cls: type[BaseSettings], *, without: frozenset[str]) -> None:
        super().__init__(settings_cls)
        self.without = without

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in super().__call__().items() if k not in self.without}


class TrainingSettings(BaseSettings):
    """What every training job shares: the data, injected noise, model and optimiser.

    :class:`CleanSettings` (LiNC, ``noisescore clean``) and :class:`ActiveSettings` (active
    label cleaning, ``noisescore active-clean``) add their method's fields.

    ``dataset_roots`` is never read from the environment: the service sets it on the jobs
    it submits (its ``NOISESCORE_DATASET_ROOTS``), so a job run by the operator keeps
    reading any dataset even where that variable is exported.
    """

    model_config = SettingsConfigDict(env_prefix="NOISESCORE_", extra="forbid")

    dataset: str = Field(
        "breastmnist",
        description="medmnist://NAME, file:///PATH.npz|.csv, s3://BUCKET/KEY, a name or a path",
    )
    data_dir: Path | None = Field(None, description="where dataset names are looked up")
    image_size: int | None = Field(None, ge=8, le=1024, description="resize images to this")
    noise: str | None = Field(None, description="KIND:RATE to inject, e.g. uniform:0.5")
    noise_val: bool = Field(False, description="also inject noise into the val split")
    seed: int = Field(0, ge=0)
    epochs: int = Field(100, ge=1, le=10_000)
    model: str = Field(DEFAULT_MODEL, description="timm model name")
    checkpoint: Path | None = Field(None, description="local pretrained weights")
    batch_size: int = Field(128, ge=2, le=65_536)
    lr: float = Field(1e-4, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0)
    lr_milestones: tuple[int, ...] | None = None
    augment: bool = Field(False, description="random horizontal flips")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    graph: Literal["auto", "on", "off"] = Field(
        "auto",
        description="capture each training step as a CUDA graph: auto = on for CUDA when "
        "every hook is graph-safe, on = require CUDA, off = eager",
    )
    data_placement: Literal["auto", "device", "stream"] = Field(
        "auto",
        description="where the training images wait: device = all on the device, stream = "
        "host memory, each batch copied ahead of its step; auto = device when the uint8 "
        "train split fits device_memory_share of a CUDA device's memory (same results)",
    )
    device_memory_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of the CUDA device's total memory the train split's uint8 "
        "images may take before data_placement auto streams them",
    )
    dataset_roots: Annotated[tuple[str, ...] | None, NoDecode] = Field(
        None,
        description="restrict the dataset to a name in data_dir or a URI under these roots "
        "(folders, s3://BUCKET/PREFIX), as for jobs submitted over the API; unset = any",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env = _EnvWithout(settings_cls, without=frozenset({"dataset_roots"}))
        return init_settings, env, dotenv_settings, file_secret_settings

    @field_validator("dataset_roots", mode="before")
    @classmethod
    def _valid_dataset_roots(cls, value: Any) -> Any:
        return _dataset_roots(value)

    @field_validator("graph")
    @classmethod
    def _graph_needs_cuda(cls, value: str, info: ValidationInfo) -> str:
        if value == "on" and info.data.get("device") == "cpu":
            raise ValueError(
                "graph 'on' captures CUDA graphs and cannot run with device 'cpu' "
                "(use graph auto or off)"
            )
        return value

    @field_validator("dataset")
    @classmethod
    def _valid_dataset_uri(cls, value: str) -> str:
        from noisescore.uris import check_dataset_uri  # syntax only: fails before any work

        return check_dataset_uri(value)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("noise")
    @classmethod
    def _valid_noise(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in ("", "none"):
            return None
        return str(parse_noise_spec(value))

    def noise_rate(self) -> float | None:
        """The injected noise's rate (``None`` without injection)."""
        return None if self.noise is None else parse_noise_spec(self.noise).rate


class CleanSettings(TrainingSettings):
    """One cleaning job: data, optional noise injection, LiNC and the final training."""

    warmup_epochs: int = Field(10, ge=1)
    alpha_lr: float = Field(1.0, gt=0)
    alpha_wd: float = Field(1e-3, ge=0)
    alpha_grad: Literal["mean", "sample"] = "mean"
    baseline: bool = Field(False, description="also train plain cross-entropy, same seed")
    detectors: str = Field(
        "all", description="label-noise detectors recorded during warm-up: all or NAME,NAME"
    )
    flag_by: str = Field(
        "linc", description="score whose Otsu split flags samples: linc, consensus or a detector"
    )
    cl_folds: int = Field(
        0, ge=0, le=20, description="K-fold out-of-fold confident learning (K extra warm-ups)"
    )
    bimodality_min: float = Field(
        ETA_MIN,
        ge=0,
        le=1,
        description="relabel only when the flagging score's between-class variance ratio "
        "(Otsu) reaches this; 0 = always relabel",
    )
    nproc: int = Field(
        1,
        ge=1,
        le=1024,
        description="training processes (DDP): `noisescore clean` starts them with torchrun; "
        "a flow run has the processes its command started (the job records how many)",
    )

    @field_validator("detectors")
    @classmethod
    def _known_detectors(cls, value: str) -> str:
        names = parse_detectors(value)
        return "all" if names == DETECTOR_NAMES else ",".join(names)

    @field_validator("cl_folds")
    @classmethod
    def _folds(cls, value: int) -> int:
        if value == 1:
            raise ValueError("cl_folds must be 0 (off) or at least 2")
        return value

    def detector_names(self) -> tuple[str, ...]:
        """The detectors this job records, ``linc`` first."""
        return parse_detectors(self.detectors)

    @model_validator(mode="after")
    def _flag_by_computed(self) -> CleanSettings:
        self.flag_by = check_flag_by(self.flag_by, self.detector_names(), self.cl_folds)
        return self

    @model_validator(mode="after")
    def _warmup_within_epochs(self) -> CleanSettings:
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must not exceed epochs ({self.epochs})"
            )
        return self


class ActiveSettings(TrainingSettings):
    """One active label cleaning job (Khanal et al., MICCAI 2024): select a clean set with a
    learning-with-noisy-labels method, train on it, then ``rounds`` rounds in which an
    expert relabels the ``budget`` most useful suspects ranked by ``sampler``.

    ``epochs`` is the selection phase's length (Co-teaching and friends); the model that
    the expert's answers refine trains ``clean_epochs`` on the clean set, then
    ``fine_tune_epochs`` after each round.
    """

    epochs: int = Field(40, ge=1, le=10_000, description="epochs of the selection phase")
    lr: float = Field(1e-3, gt=0, le=10, description="Adam learning rate (Co-teaching's 0.001)")
    imbalance: float | None = Field(
        None,
        ge=1,
        le=10_000,
        description="draw a long-tailed train subset with this ratio r: N_c = N_0 r^(-c/(C-1))",
    )
    lnl_method: str = Field(
        "coteaching_vog", description=f"clean-set selection: {', '.join(SELECTION_METHODS)}"
    )
    forget_rate: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Co-teaching's final forget rate tau_max; unset = the injected noise rate",
    )
    t_k: int = Field(10, ge=1, description="epochs over which the forget rate ramps up")
    mix_ratio: float = Field(
        0.2, ge=0, le=1, description="Co-teaching VOG: share of the kept samples chosen by VOG"
    )
    vog_window: int = Field(5, ge=2, le=100, description="epochs of gradients VOG looks at")
    vog_warmup: int = Field(10, ge=0, description="epochs of plain Co-teaching before VOG")
    vog_mode: Literal["exact", "ewma"] = Field(
        "exact", description="VOG over an exact window (float16) or an exponentially weighted one"
    )
    select_last: int = Field(
        1, ge=1, description="the clean set is the union of what was kept in these last epochs"
    )
    clean_epochs: int = Field(30, ge=1, le=10_000, description="training on the clean set")
    sampler: str = Field("entropy", description=f"ranks suspects: {', '.join(SAMPLER_NAMES)}")
    rounds: int = Field(8, ge=0, le=100, description="relabelling rounds M")
    budget: int = Field(64, ge=1, le=1_000_000, description="samples relabelled per round a_l")
    fine_tune_epochs: int = Field(5, ge=0, le=10_000, description="epochs after each round")
    fine_tune_lr: float = Field(1e-3, gt=0, le=10, description="Adam learning rate of the rounds")
    keep_start: bool = Field(
        True,
        description="a round keeps the weights it started from unless a fine-tuning epoch "
        "beats them on validation",
    )
    expert: Literal["human", "oracle"] = Field(
        "human",
        description="who answers: human (the run waits for SubmitRelabels / the Prefect UI) "
        "or oracle (the true labels; benchmarks only, needs the truth)",
    )
    label_timeout: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="seconds a Prefect deployment run stays suspended waiting for an expert",
    )

    @field_validator("lnl_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return check_choice("lnl_method", value, SELECTION_METHODS)

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        return check_choice("sampler", value, SAMPLER_NAMES)

    @model_validator(mode="after")
    def _forget_rate_known(self) -> ActiveSettings:
        if self.lnl_method != "ce" and self.forget_rate is None and self.noise is None:
            raise ValueError(
                "forget_rate is needed: Co-teaching drops that share of each batch; set it to "
                "the expected noise rate (e.g. --forget-rate 0.2), or inject noise with --noise"
            )
        return self

    def tau_max(self) -> float:
        """The forget rate Co-teaching ramps up to: ``forget_rate``, else the noise rate."""
        if self.forget_rate is not None:
            return self.forget_rate
        rate = self.noise_rate()
        return 0.0 if rate is None else min(rate, 0.95)


#: The benchmark's default grid: LNMBench's datasets and noise settings of issue 12.
BENCH_DATASETS: tuple[str, ...] = ("bloodmnist", "pneumoniamnist")
BENCH_NOISE: tuple[str, ...] = (
    "symmetric:0.2",
    "symmetric:0.4",
    "symmetric:0.6",
    "instance:0.2",
    "instance:0.4",
)
#: The noise setting of a dataset whose labels are already noisy: a CSV manifest's
#: ``label`` column is trained on, its ``true_label`` column scores the result.
REAL_NOISE = "real"


def _comma_list(value: Any) -> Any:
    """``"a,b"`` (CLI, environment) -> ``("a", "b")``; lists pass through."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _no_duplicates(what: str, values: tuple[Any, ...]) -> tuple[Any, ...]:
    if not values:
        raise ValueError(f"the grid needs at least one {what}")
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"{what} listed twice: {', '.join(map(str, seen))}")
    return values


class BenchSettings(BaseSettings):
    """One learning-with-noisy-labels benchmark (``noisescore bench``, flow
    ``lnl-benchmark``): a grid of methods x datasets x noise settings x seeds, each cell
    trained with one schedule (the fields below the grid).

    Read from ``NOISESCORE_BENCH_*`` (not ``NOISESCORE_*``: a cleaning job's
    ``NOISESCORE_EPOCHS`` must not change a benchmark's schedule). The grid is checked as a
    whole before anything runs: an unknown method, a noise rate outside ``[0, 1)``, a
    malformed dataset URI or a repeated entry is an error naming it.
    """

    model_config = SettingsConfigDict(env_prefix="NOISESCORE_BENCH_", extra="forbid")

    methods: Annotated[tuple[str, ...], NoDecode] = Field(
        BENCH_METHODS, description="methods to compare (comma list)"
    )
    datasets: Annotated[tuple[str, ...], NoDecode] = Field(
        BENCH_DATASETS, description="dataset names or URIs (comma list)"
    )
    noise: Annotated[tuple[str, ...], NoDecode] = Field(
        BENCH_NOISE,
        description=f"noise settings KIND:RATE with RATE in [0, 1), or {REAL_NOISE!r} "
        "(a manifest's own label / true_label columns)",
    )
    seeds: Annotated[tuple[int, ...], NoDecode] = Field((0, 1), description="seeds (comma list)")
    epochs: int = Field(100, ge=1, le=10_000)
    batch_size: int = Field(128, ge=2, le=65_536)
    lr: float = Field(1e-3, gt=0, le=10, description="Adam learning rate (LNMBench's 0.001)")
    weight_decay: float = Field(0.0, ge=0)
    model: str = Field(DEFAULT_MODEL, description="timm model name")
    augment: bool = Field(False, description="random horizontal flips")
    train_size: int | None = Field(
        None, ge=2, description="train on a random subset of this size per dataset and seed"
    )
    eval_size: int | None = Field(
        None, ge=1, description="score on random subsets of val and test of this size"
    )
    last_k: int = Field(5, ge=1, description="test accuracy is averaged over the last k epochs")
    concurrency: int = Field(1, ge=1, le=256, description="cells trained at the same time")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data_dir: Path | None = Field(None, description="where dataset names are looked up")

    @field_validator("methods", "datasets", "noise", "seeds", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _no_duplicates("method", tuple(check_method_name(m) for m in value))

    @field_validator("datasets")
    @classmethod
    def _valid_datasets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from noisescore.uris import check_dataset_uri

        return _no_duplicates("dataset", tuple(check_dataset_uri(d) for d in value))

    @field_validator("noise")
    @classmethod
    def _valid_noise(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        specs = []
        for text in value:
            if text.strip().lower() == REAL_NOISE:
                specs.append(REAL_NOISE)
                continue
            spec = parse_noise_spec(text)
            if spec.rate is not None and not spec.rate < 1.0:
                raise ValueError(f"noise rate must lie in [0, 1), got {text!r}")
            specs.append(str(spec))
        return _no_duplicates("noise setting", tuple(specs))

    @field_validator("seeds")
    @classmethod
    def _valid_seeds(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 0 for s in value):
            raise ValueError(f"seeds must be >= 0, got {', '.join(map(str, value))}")
        return _no_duplicates("seed", value)

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return check_model_name(value)

    def schedule(self) -> dict[str, Any]:
        """The fields that change a cell's result besides the cell itself (a resumed
        benchmark must have the same)."""
        keep: tuple[str, ...] = ("epochs", "batch_size", "lr", "weight_decay", "model")
        keep += ("augment", "train_size", "eval_size", "last_k")
        return {k: v for k, v in self.model_dump(mode="json").items() if k in keep}


def format_settings_error(err: ValidationError) -> str:
    """One line for a :class:`CleanSettings` validation error, naming each bad field by its
    ``noisescore clean`` flag (``--epochs: …``); cross-field checks are given as they are.
    The CLI prints it and the flow fails with it, so both say the same thing."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        # Model-level checks (e.g. warm-up vs epochs) have no location: no "--" prefix then.
        parts.append(f"--{where.replace('_', '-')}: {msg}" if where else msg)
    return "; ".join(parts)


class StoreSettings(BaseSettings):
    """Where job artifacts live: MinIO/S3 when an endpoint is set, else a local directory.

    Read from ``NOISESCORE_S3_*`` and ``NOISESCORE_STORE_DIR``; credentials are secrets and
    never appear in logs, reports or flow parameters.
    """

    model_config = SettingsConfigDict(env_prefix="NOISESCORE_", extra="ignore")

    s3_endpoint: str | None = Field(
        None, description="host:port or http(s)://host:port of MinIO/S3; unset = local store"
    )
    s3_bucket: str = Field("noisescore", min_length=3, max_length=63)
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_secure: bool = Field(False, description="TLS to the endpoint (https)")
    s3_region: str = "us-east-1"
    store_dir: Path = Field(Path("artifacts"), description="local store root (no endpoint)")
    job_lease_ttl: float = Field(
        60.0,
        ge=1.0,
        le=3600.0,
        description="seconds a job's lease (jobs/<id>/lease.json, refreshed every third of "
        "it by the process running the job) stays valid without a heartbeat",
    )
    s3_max_object_bytes: int = Field(
        4 * 1024**3,
        ge=1,
        description="largest object an s3:// dataset fetches (the .npz, the manifest, each "
        "image it lists)",
    )


class ServiceSettings(BaseSettings):
    """The gRPC service (``noisescore serve``): addresses, auth, TLS, limits.

    ``NOISESCORE_AUTH_TOKENS`` holds comma-separated bearer tokens; when set, every RPC
    except health checking needs ``authorization: Bearer <token>``.
    """

    model_config = SettingsConfigDict(env_prefix="NOISESCORE_", extra="ignore")

    grpc_addr: str = Field("127.0.0.1:50051", description="host:port the gRPC server binds")
    metrics_addr: str | None = Field(
        "127.0.0.1:9464", description="host:port of the Prometheus /metrics endpoint; empty = off"
    )
    health_addr: str | None = Field(
        None,
        description="host:port of a plaintext server with only gRPC health checking (for "
        "probes that cannot use TLS or tokens); empty = health on grpc_addr only",
    )
    auth_tokens: SecretStr | None = Field(None, description="comma-separated bearer tokens")
    tls_cert: Path | None = Field(None, description="server certificate (PEM); enables TLS")
    tls_key: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca: Path | None = Field(None, description="CA of client certificates: mTLS")
    rpc_threads: int = Field(16, ge=1, le=1024, description="concurrent RPCs")
    job_workers: int = Field(1, ge=1, le=64, description="cleaning jobs run at once")
    max_queue: int = Field(16, ge=0, le=10_000, description="queued jobs before RESOURCE_EXHAUSTED")
    max_batch: int = Field(1024, ge=1, le=65_536, description="images per Predict/ScoreLabels")
    max_request_pixels: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="decoded pixels one Predict/ScoreLabels request may need: each image's "
        "width x height (x2 for 16-bit) plus the model's input size; checked on the headers",
    )
    max_inflight_pixels: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="decoded pixels all Predict/ScoreLabels requests may hold at once; "
        "past it RESOURCE_EXHAUSTED",
    )
    max_watches: int = Field(
        1000, ge=1, le=100_000, description="open WatchJob streams; past it RESOURCE_EXHAUSTED"
    )
    saturation_grace: float = Field(
        5.0,
        gt=0,
        description="seconds a call may wait for an RPC thread before readiness (health of "
        "noisescore.v1.NoiseScoring) turns NOT_SERVING",
    )
    onnx_threads: int = Field(
        0, ge=0, le=256, description="onnxruntime threads per call; 0 = one per core"
    )
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="gRPC message limit")
    job_runner: Literal["auto", "local", "prefect"] = Field(
        "auto",
        description="local: child processes of the service; prefect: runs of "
        "prefect_deployment; auto: prefect when PREFECT_API_URL is set, else local",
    )
    prefect_deployment: str = Field(
        "clean-labels/local", description="deployment that runs jobs in prefect mode"
    )
    prefect_active_deployment: str = Field(
        "active-clean/local",
        description="deployment that runs active cleaning jobs in prefect mode",
    )
    shutdown_grace: float = Field(10.0, ge=0, description="seconds in-flight RPCs may finish")
    dataset_roots: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="comma-separated folders and s3://BUCKET/PREFIX roots whose datasets "
        "submitted jobs may read, besides the dataset names in the data directory",
    )
    insecure: bool = Field(
        False,
        description="allow binding grpc_addr to a non-loopback address without auth_tokens or mTLS",
    )

    @field_validator("dataset_roots", mode="before")
    @classmethod
    def _valid_dataset_roots(cls, value: Any) -> Any:
        return _dataset_roots(value) or ()

    def authenticated(self) -> bool:
        """Whether callers must prove who they are: bearer tokens or client certificates."""
        return bool(self.tokens()) or self.tls_client_ca is not None

    def runner(self) -> Literal["local", "prefect"]:
        """The job runner ``auto`` resolves to (a Prefect API configured in the env)."""
        if self.job_runner != "auto":
            return self.job_runner
        return "prefect" if os.environ.get("PREFECT_API_URL") else "local"

    def tokens(self) -> list[str]:
        """The configured bearer tokens (empty: authentication is off)."""
        if self.auth_tokens is None:
            return []
        return [t.strip() for t in self.auth_tokens.get_secret_value().split(",") if t.strip()]

    @model_validator(mode="after")
    def _tls_pair(self) -> ServiceSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        return self
