"""The FineTuneJob contract shared by the operator and the trainer.

Torch-free on purpose: the operator image imports it without the ML stack. Field names are
camelCase on the wire (Kubernetes style) and snake_case in Python. The CRD schema in `crds/`
is generated from these models (`kubetune_api.crd`), so every description here is what
`kubectl explain finetunejob.spec...` prints.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAME = "ftj"
TINY_SCHEME = "tiny://"
TINY_ARCHITECTURES = ("llama", "gpt2", "bert", "t5")


class SpecModel(BaseModel):
    """Base: camelCase aliases, unknown fields rejected (typos must not be silently ignored)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True
    )


class Task(StrEnum):
    CAUSAL_LM = "causal-lm"
    MASKED_LM = "masked-lm"
    SEQ2SEQ_LM = "seq2seq-lm"
    SEQUENCE_CLASSIFICATION = "sequence-classification"


class MethodType(StrEnum):
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


class ModelSpec(SpecModel):
    name: str = Field(
        min_length=1,
        description="Hugging Face model id or local path, or tiny://llama|gpt2|bert|t5 for a small "
        "random model built from a config (tests, CI, laptops).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    task: Task = Field(Task.CAUSAL_LM, description="Training objective and model head.")
    num_labels: int | None = Field(
        None, ge=2, description="Number of classes; required for sequence-classification."
    )
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="Attention implementation: auto = FlashAttention-2 where it is "
        "installed and the GPU and model support it, else PyTorch SDPA where the model supports "
        "it, else eager; flash_attention_2 needs a CUDA GPU and the flash-attn package."
    )

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.task == Task.SEQUENCE_CLASSIFICATION and self.num_labels is None:
            raise ValueError("numLabels is required when task is sequence-classification")
        if self.task != Task.SEQUENCE_CLASSIFICATION and self.num_labels is not None:
            raise ValueError("numLabels only applies to task sequence-classification")
        if self.name.startswith(TINY_SCHEME):
            arch = self.name.removeprefix(TINY_SCHEME)
            if arch not in TINY_ARCHITECTURES:
                raise ValueError(f"unknown tiny model {self.name!r}; use one of "
                                 + ", ".join(TINY_SCHEME + a for a in TINY_ARCHITECTURES))
        return self


class LoraSpec(SpecModel):
    r: int = Field(16, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description='Module names to adapt (e.g. [q_proj, v_proj]) or "all-linear" for every '
        "linear layer except the output head.",
    )
    use_dora: bool = Field(False, description="DoRA: split each adapted weight into magnitude "
                           "and direction and train both (peft use_dora).")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of "
                             "alpha / r, which keeps high ranks stable (peft use_rslora).")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter "
        "(e.g. [embed_tokens, lm_head] when dataset.addSpecialTokens adds tokens)."
    )


class QuantizationSpec(SpecModel):
    bits: Literal[4, 8] = Field(4, description="Weight bits of the frozen base model (4 or 8).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Dtype of matmuls on dequantized weights; auto = the training precision "
        "(bfloat16 on GPUs that support it, float16 on older ones, float32 on CPU).",
    )


class MethodSpec(SpecModel):
    type: MethodType = Field(description="full: all weights; lora: adapters; qlora: adapters "
                             "over a quantized base.")
    lora: LoraSpec | None = Field(None, description="Adapter settings (lora and qlora).")
    quantization: QuantizationSpec | None = Field(
        None, description="Base model quantization; required for qlora."
    )

    @model_validator(mode="after")
    def _check(self) -> MethodSpec:
        if self.type == MethodType.QLORA and self.quantization is None:
            raise ValueError("quantization is required when type is qlora")
        if self.type != MethodType.QLORA and self.quantization is not None:
            raise ValueError("quantization only applies to type qlora")
        if self.type == MethodType.FULL and self.lora is not None:
            raise ValueError("lora does not apply to type full")
        if self.type != MethodType.FULL and self.lora is None:
            self.lora = LoraSpec()
        return self


class FieldsSpec(SpecModel):
    """Which record fields hold the training signal. Allowed combinations: text; text+label;
    prompt+completion; messages."""

    text: str | None = Field(None, description="Field with plain text.")
    prompt: str | None = Field(None, description="Field with the prompt (no loss on it).")
    completion: str | None = Field(None, description="Field with the completion (loss on it).")
    messages: str | None = Field(
        None, description="Field with chat messages [{role, content}]; rendered with the "
        "tokenizer's chat template, loss on assistant turns only."
    )
    label: str | None = Field(None, description="Field with the class label (int or string).")

    @model_validator(mode="after")
    def _check(self) -> FieldsSpec:
        chosen = frozenset(k for k, v in self.model_dump().items() if v is not None)
        if chosen not in FIELD_LAYOUTS:
            allowed = "; ".join("+".join(sorted(c)) for c in FIELD_LAYOUTS)
            got = "+".join(sorted(chosen)) or "nothing"
            raise ValueError(f"fields must be one of: {allowed} (got {got})")
        return self

    @property
    def layout(self) -> str:
        """One of text, classification, prompt-completion, messages."""
        chosen = frozenset(k for k, v in self.model_dump().items() if v is not None)
        return FIELD_LAYOUTS[chosen]


FIELD_LAYOUTS = {
    frozenset({"text"}): "text",
    frozenset({"text", "label"}): "classification",
    frozenset({"prompt", "completion"}): "prompt-completion",
    frozenset({"messages"}): "messages",
}


class DatasetSpec(SpecModel):
    train: str = Field(min_length=1, description="Training data: local path, file://, s3://, "
                       "gs:// or hf://datasets/<id>/<file>.")
    eval: str | None = Field(None, description="Evaluation data (same forms as train).")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Hold out this fraction of train for evaluation when eval "
        "is not given."
    )
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "text"] = Field(
        "auto", description="File format; auto picks it from the file extension."
    )
    fields: FieldsSpec = Field(default_factory=lambda: FieldsSpec(text="text"),
                               description="Record fields to train on.")
    max_seq_length: int = Field(1024, ge=8, description="Tokens per sequence (longer is cut).")
    packing: bool = Field(False, description="Concatenate causal-LM examples into full "
                          "maxSeqLength blocks (no padding).")
    add_special_tokens: list[str] = Field(
        default_factory=list, description="New special tokens added to the tokenizer (e.g. "
        "[<|tool|>]); the model's embeddings are resized to match. With lora/qlora, list the "
        "embedding and output modules in method.lora.modulesToSave so the new rows train."
    )


class Strategy(StrEnum):
    DDP = "ddp"
    FSDP = "fsdp"
    DEEPSPEED_ZERO2 = "deepspeed-zero2"
    DEEPSPEED_ZERO3 = "deepspeed-zero3"


class EarlyStoppingSpec(SpecModel):
    patience: int = Field(3, ge=1, description="Evaluations without improvement before "
                          "training stops.")
    threshold: float = Field(0.0, ge=0, description="Smallest change of the metric that "
                             "counts as an improvement.")


class TrainingSpec(SpecModel):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer "
                                  "steps (overrides epochs).")
    per_device_batch_size: int = Field(4, ge=1, description="Sequences per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per "
                                             "optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup",
                          "cosine_with_restarts", "polynomial", "inverse_sqrt"] = Field(
        "cosine", description="Learning-rate schedule after warm-up.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps to warm up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto = bf16 where the GPU supports it, fp16 on older GPUs, fp32 "
        "on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the "
                                         "backward pass to save memory.")
    strategy: Strategy = Field(Strategy.DDP, description="Distribution strategy across ranks.")
    strategy_config: dict[str, Any] = Field(
        default_factory=dict, description="Keys deep-merged over the generated DeepSpeed config "
        "(deepspeed-*) or FSDP config (fsdp), e.g. {zero_optimization: {offload_optimizer: "
        "{device: cpu}}}.")
    seed: int = Field(42, description="Seed for weights init, data order and dropout.")
    pretrain: bool = Field(False, description="Start from the model's config with random "
                           "weights instead of its pretrained weights.")
    log_every_steps: int = Field(10, ge=1, description="Log loss every N steps.")
    eval_every_steps: int | None = Field(None, ge=1, description="Evaluate every N steps "
                                         "(default: at the end only).")
    optimizer: Literal["adamw", "adamw_fused", "adamw_8bit", "paged_adamw_8bit",
                       "paged_adamw_32bit", "adafactor", "lion"] = Field(
        "adamw", description="adamw (PyTorch), adamw_fused (PyTorch's fused kernel), "
        "adamw_8bit (bitsandbytes 8-bit states), paged_adamw_8bit / paged_adamw_32bit "
        "(bitsandbytes, states paged to host memory; CUDA only), adafactor, lion "
        "(bitsandbytes Lion).")
    min_learning_rate_ratio: float | None = Field(
        None, ge=0, lt=1, description="With lrScheduler cosine: decay to this fraction of the "
        "peak learning rate instead of to zero.")
    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune: add uniform noise of this scale to the input "
        "embeddings while training (typical 5).")
    liger_kernels: bool = Field(False, description="Patch the model with Liger's Triton "
                                "kernels (CUDA and the liger-kernel package).")
    compile: bool = Field(False, description="torch.compile the model before training.")
    early_stopping: EarlyStoppingSpec | None = Field(
        None, description="Stop when bestMetric has not improved for patience evaluations "
        "(needs evalEverySteps and eval data).")
    load_best_at_end: bool = Field(False, description="After training, load the checkpoint "
                                   "with the best bestMetric and publish that (needs "
                                   "evalEverySteps and eval data).")
    best_metric: Literal["loss", "accuracy", "f1", "perplexity"] = Field(
        "loss", description="Eval metric for earlyStopping and loadBestAtEnd: loss and "
        "perplexity (lower is better), accuracy and f1 (sequence-classification; higher is "
        "better).")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers. tensorboard event files are "
        "published under logs/ in the output; mlflow and wandb read their endpoint and key "
        "from the environment (MLFLOW_TRACKING_URI, WANDB_API_KEY, ...).")

    @model_validator(mode="after")
    def _check(self) -> TrainingSpec:
        if self.min_learning_rate_ratio is not None and self.lr_scheduler != "cosine":
            raise ValueError("minLearningRateRatio only applies to lrScheduler cosine")
        if (self.early_stopping or self.load_best_at_end) and self.eval_every_steps is None:
            raise ValueError("earlyStopping and loadBestAtEnd compare periodic evaluations; "
                             "set evalEverySteps")
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError("reportTo lists a tracker twice")
        return self


class ResourcesSpec(SpecModel):
    nodes: int = Field(1, ge=1, description="Pods in the torchrun gang (one per node).")
    gpus_per_node: int = Field(1, ge=0, description="GPUs per pod = torchrun processes per "
                               "node (0 = one CPU process).")


class PodSpec(SpecModel):
    """Where and how the gang's pods run (copied into every pod of the Job)."""

    image: str | None = Field(None, description="Trainer image (default: the operator's "
                              "configured trainer image).")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secret names "
                                          "for pulling the image.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the "
                                          "pods require.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod "
                                              "tolerations (core/v1 Toleration).")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity (core/v1 Affinity).")
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods.")
    scheduler_name: str | None = Field(None, description="Scheduler for the pods (e.g. a gang "
                                       "scheduler).")
    cpu: str | None = Field(None, description="CPU request and limit per pod (e.g. '8').")
    memory: str | None = Field(None, description="Memory request and limit per pod "
                               "(e.g. '64Gi').")
    shm_size: str = Field("8Gi", description="Size of the in-memory /dev/shm volume.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment "
                                "variables for the trainer.")


class StorageSpec(SpecModel):
    """Object-storage access for dataset, checkpoints and output."""

    secret_name: str | None = Field(None, description="Secret whose keys become environment "
                                    "variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                                    "GOOGLE_APPLICATION_CREDENTIALS, ...); default: the "
                                    "operator's configured storage Secret.")
    endpoint_url: str | None = Field(None, description="S3 endpoint for MinIO/Ceph/other "
                                     "S3-compatible stores.")
    region: str | None = Field(None, description="S3 region.")


class MetricsSpec(SpecModel):
    port: int = Field(9400, ge=1024, le=65535, description="Port of each rank's Prometheus "
                      "/metrics (rank r listens on port + local rank).")


class SamplesSpec(SpecModel):
    prompts: list[str] = Field(min_length=1, description="Prompts to complete with the "
                               "trained model (greedy decoding).")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Tokens generated per prompt.")


class OutputSpec(SpecModel):
    uri: str = Field(min_length=1, description="Where the adapter or model is written: path, "
                     "file://, s3:// or gs://.")
    merge_adapter: bool = Field(False, description="Also write the base model with the adapter "
                                "merged in (under merged/).")
    samples: SamplesSpec | None = Field(
        None, description="Generate from the trained model (adapter applied) after training "
        "and publish samples.jsonl with the artifact (causal-lm and seq2seq-lm).")


class CheckpointSpec(SpecModel):
    uri: str | None = Field(None, description="Checkpoint location (default "
                            "<output.uri>/checkpoints/).")
    every_steps: int | None = Field(None, ge=1, description="Save every N optimizer steps "
                                    "(default: no periodic checkpoints).")
    keep_last: int = Field(2, ge=1, description="Complete checkpoints to keep.")


class RunPolicySpec(SpecModel):
    backoff_limit: int = Field(3, ge=0, description="Gang restarts before the job fails.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the job after "
                                                "this many seconds running.")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, description="Delete the job this "
                                                   "long after it finishes.")
    suspend: bool = Field(False, description="Stop the pods (they checkpoint first); false "
                          "resumes.")


class FineTuneJobSpec(SpecModel):
    model: ModelSpec = Field(description="Base model and task.")
    method: MethodSpec = Field(description="Which weights train, and how.")
    dataset: DatasetSpec = Field(description="Training and evaluation data.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimization.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Gang shape.")
    output: OutputSpec = Field(description="Where the result is written.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec,
                                       description="Periodic checkpoints and resume.")
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec,
                                      description="Restarts, deadlines, clean-up, suspension.")
    pod: PodSpec = Field(default_factory=PodSpec, description="Pod placement and image.")
    storage: StorageSpec = Field(default_factory=StorageSpec,
                                 description="Object storage.")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec,
                                 description="Prometheus metrics.")

    @model_validator(mode="after")
    def _check(self) -> FineTuneJobSpec:
        task, layout = self.model.task, self.dataset.fields.layout
        allowed = TASK_LAYOUTS[Task(task)]
        if layout not in allowed:
            raise ValueError(f"dataset.fields {layout} does not fit task {task} "
                             f"(use {' or '.join(allowed)})")
        if self.dataset.packing and task != Task.CAUSAL_LM:
            raise ValueError("dataset.packing only applies to task causal-lm")
        if self.training.pretrain and self.method.type != MethodType.FULL:
            raise ValueError("training.pretrain trains every weight from a random init; "
                             "it needs method.type full")
        self._check_options(Task(task))
        return self

    def _check_options(self, task: Task) -> None:
        best = self.training.best_metric
        if best in ("accuracy", "f1") and task != Task.SEQUENCE_CLASSIFICATION:
            raise ValueError(f"training.bestMetric {best} needs task sequence-classification")
        if best == "perplexity" and task == Task.SEQUENCE_CLASSIFICATION:
            raise ValueError("training.bestMetric perplexity needs a language-modelling task")
        if self.output.samples and task not in (Task.CAUSAL_LM, Task.SEQ2SEQ_LM):
            raise ValueError("output.samples generates text; it needs task causal-lm or "
                             "seq2seq-lm")
        every, evals = self.checkpoint.every_steps, self.training.eval_every_steps
        if self.training.load_best_at_end and every and evals and every % evals:
            raise ValueError(f"training.loadBestAtEnd picks among checkpoints saved at "
                             f"evaluations: checkpoint.everySteps ({every}) must be a multiple "
                             f"of training.evalEverySteps ({evals})")
        if self.training.neftune_noise_alpha and task == Task.SEQUENCE_CLASSIFICATION:
            raise ValueError("training.neftuneNoiseAlpha applies to generative tasks")


TASK_LAYOUTS: dict[Task, tuple[str, ...]] = {
    Task.CAUSAL_LM: ("text", "prompt-completion", "messages"),
    Task.MASKED_LM: ("text",),
    Task.SEQ2SEQ_LM: ("prompt-completion",),
    Task.SEQUENCE_CLASSIFICATION: ("classification",),
}


class FineTuneJob(SpecModel):
    """A whole FineTuneJob object, as `kubectl apply` takes it."""

    model_config = ConfigDict(extra="ignore")  # status and unknown top-level keys pass through
    api_version: Literal["kubetune.dev/v1alpha1"] = "kubetune.dev/v1alpha1"
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneJobSpec

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "finetunejob"))
