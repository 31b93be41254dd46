"""The FineTuneJob contract shared by the operator and the trainer.

Torch-free on purpose: the operator image imports it without the ML stack. Field names are
camelCase on the wire (Kubernetes style) and snake_case in Python. The CRD schema in `crds/`
is generated from these models (`kubetune_api.crd`), so every description here is what
`kubectl explain finetunejob.spec...` prints.
"""

from __future__ import annotations

import posixpath
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubetune_api import contract
from kubetune_api.contract import DEFAULT_MASTER_PORT
from kubetune_api.oci import parse_reference
from kubetune_api.redact import looks_like_credential

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAME = "ftj"
TINY_SCHEME = "tiny://"
TINY_ARCHITECTURES = ("llama", "gpt2", "bert", "t5")

# Bounds on every free-form field. The CRD carries them (maxLength, maxItems, maxProperties),
# so the API server refuses an oversized spec before the operator reads it; the contract
# enforces the same ones. The whole spec is capped too (load.MAX_SPEC_BYTES).
MAX_NAME = 253  # object names, quantities, label-like values
MAX_SHORT = 1024  # dataset field names, paths, revisions
MAX_URI = 2048  # URIs, images
MAX_TEXT = 64 * 1024  # an inline chat template, an annotation value, an env value
MAX_ITEMS = 64  # lists: tolerations, volumes, prompts, ...
MAX_PROPERTIES = 64  # maps and core/v1 structures passed through
MAX_ENV = 128  # spec.pod.env
Name = Annotated[str, Field(max_length=MAX_NAME)]
Short = Annotated[str, Field(max_length=MAX_SHORT)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Structure = Annotated[dict[str, Any], Field(max_length=MAX_PROPERTIES)]


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


DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# An extended resource: a domain-prefixed name (nvidia.com/gpu, amd.com/gpu, rdma/hca_shared).
EXTENDED_RESOURCE = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


class ModelCacheSpec(SpecModel):
    """A PersistentVolumeClaim shared by jobs as the Hugging Face Hub cache."""

    pvc: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                     description="Name of a ReadWriteMany (or, with readOnly, ReadOnlyMany) "
                     "claim in the job's namespace, mounted as the Hub cache (HF_HUB_CACHE): the "
                     "first job downloads the model, later jobs and restarts read it. The Hub "
                     "client's per-file locks keep concurrent downloaders from corrupting it.")
    read_only: bool = Field(False, description="Mount the claim read-only and run the Hub "
                            "client offline (HF_HUB_OFFLINE=1): the cache must already hold the "
                            "model.")


class TokenSecretSpec(SpecModel):
    """A key of a Secret holding a Hugging Face access token (gated or private models)."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                      description="Secret in the job's namespace.")
    key: str = Field("HF_TOKEN", max_length=MAX_SHORT, min_length=1,
                     pattern=r"^[-._a-zA-Z0-9]+$",
                     description="Key of the Secret holding the token.")


class ModelSpec(SpecModel):
    name: str = Field(
        max_length=MAX_URI, min_length=1,
        description="Hugging Face model id or local path, or tiny://llama|gpt2|bert|t5 for a small "
        "random model built from a config (tests, CI, laptops).",
    )
    revision: str | None = Field(None, max_length=MAX_SHORT,
                                 description="Hub revision (branch, tag or commit) to load.")
    task: Task = Field(Task.CAUSAL_LM, description="Training objective and model head.")
    num_labels: int | None = Field(
        None, ge=2, description="Number of classes; required for sequence-classification."
    )
    cache: ModelCacheSpec | None = Field(None, description="Shared Hub cache on a "
                                         "PersistentVolumeClaim (default: a per-pod emptyDir).")
    token_secret: TokenSecretSpec | None = Field(
        None, description="Secret key with a Hugging Face token for gated or private models; "
        "mounted as a file only the trainer's Hub client reads (HF_TOKEN_PATH), never put in "
        "the ConfigMap, status, events or logs.")
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
    target_modules: Annotated[list[Short], Field(max_length=MAX_ITEMS)] | Literal[
            "all-linear"] = Field(
        "all-linear",
        description='Module names to adapt (e.g. [q_proj, v_proj]) or "all-linear" for every '
        "linear layer except the output head.",
    )
    use_dora: bool = Field(False, description="DoRA: split each adapted weight into magnitude "
                           "and direction and train both (peft use_dora).")
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of "
                             "alpha / r, which keeps high ranks stable (peft use_rslora).")
    modules_to_save: list[Short] = Field(
        default_factory=list, max_length=MAX_ITEMS,
        description="Modules trained in full and saved with the adapter "
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


ChatRole = Literal["system", "user", "assistant", "tool"]
# ShareGPT's role names (LLaMA-Factory's and axolotl's defaults) -> OpenAI chat roles.
SHAREGPT_ROLES: dict[str, str] = {"human": "user", "gpt": "assistant", "system": "system",
                                  "tool": "tool"}
# The keys that name the training signal; the other FieldsSpec keys describe a record type.
TRAINING_ROLES = ("text", "prompt", "completion", "messages", "label", "chosen", "rejected")
SHAREGPT_KEYS = ("role", "content", "roles")
ALPACA_KEYS = ("instruction", "input", "output")


class FieldsSpec(SpecModel):
    """Which record fields hold the training signal. Allowed combinations: text; text+label;
    prompt+completion; messages; prompt+chosen+rejected and chosen+rejected (dpo, orpo).
    type sharegpt adds role, content and roles; type alpaca instruction, input and output."""

    text: str | None = Field(None, max_length=MAX_SHORT, description="Field with plain text.")
    prompt: str | None = Field(None, max_length=MAX_SHORT,
                               description="Field with the prompt (no loss on it).")
    completion: str | None = Field(None, max_length=MAX_SHORT,
                                   description="Field with the completion (loss on it).")
    messages: str | None = Field(
        None, max_length=MAX_SHORT,
        description="Field with chat messages [{role, content}]; rendered with the "
        "tokenizer's chat template, loss on assistant turns only. type sharegpt: the "
        "conversation field (default conversations)."
    )
    label: str | None = Field(None, max_length=MAX_SHORT,
                              description="Field with the class label (int or string).")
    chosen: str | None = Field(
        None, max_length=MAX_SHORT,
        description="Preference objectives (dpo, orpo): field with the preferred "
        "response: a string (with prompt) or a messages list whose leading turns, shared with "
        "rejected, are the prompt."
    )
    rejected: str | None = Field(
        None, max_length=MAX_SHORT,
        description="Preference objectives: field with the dispreferred response (same "
        "form as chosen)."
    )
    role: str | None = Field(None, max_length=MAX_SHORT, description="type sharegpt: the "
                             "key of a message's role (default from).")
    content: str | None = Field(None, max_length=MAX_SHORT, description="type sharegpt: the "
                                "key of a message's text (default value).")
    roles: dict[str, ChatRole] | None = Field(
        None, max_length=MAX_PROPERTIES, description="type sharegpt: the record's role names "
        "-> system, user, assistant or tool; merged over the default {human: user, gpt: "
        "assistant, system: system, tool: tool}."
    )
    instruction: str | None = Field(None, max_length=MAX_SHORT, description="type alpaca: "
                                    "the instruction field (default instruction).")
    input: str | None = Field(None, max_length=MAX_SHORT, description="type alpaca: the "
                              "optional input field, joined to the instruction (default "
                              "input).")
    output: str | None = Field(None, max_length=MAX_SHORT, description="type alpaca: the "
                               "response field (default output).")

    @model_validator(mode="after")
    def _check(self) -> FieldsSpec:
        if self.signal not in FIELD_LAYOUTS:
            allowed = "; ".join("+".join(sorted(c)) for c in FIELD_LAYOUTS)
            got = "+".join(sorted(self.signal)) or "nothing"
            raise ValueError(f"fields must be one of: {allowed} (got {got})")
        return self

    @property
    def signal(self) -> frozenset[str]:
        """The training roles set (the record-type keys aside)."""
        return frozenset(k for k in TRAINING_ROLES if getattr(self, k) is not None)

    @property
    def layout(self) -> str:
        """One of text, classification, prompt-completion, messages, preference,
        conversational-preference."""
        return FIELD_LAYOUTS[self.signal]


FIELD_LAYOUTS = {
    frozenset({"text"}): "text",
    frozenset({"text", "label"}): "classification",
    frozenset({"prompt", "completion"}): "prompt-completion",
    frozenset({"messages"}): "messages",
    frozenset({"prompt", "chosen", "rejected"}): "preference",
    frozenset({"chosen", "rejected"}): "conversational-preference",
}
PREFERENCE_LAYOUTS = ("preference", "conversational-preference")


# Built-in chat templates (the texts live in the trainer: kubetune_trainer/chat.py).
CHAT_TEMPLATE_NAMES = ("chatml", "llama3", "alpaca")

# dataset.type: the shape of a record. Every type but `fields` becomes a conversation.
RecordType = Literal["fields", "sharegpt", "alpaca", "openai"]
FileFormat = Literal["auto", "jsonl", "json", "parquet", "csv", "text"]
TYPE_FIELDS: dict[str, dict[str, Any]] = {
    "fields": {"text": "text"},
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value",
                 "roles": SHAREGPT_ROLES},
    "alpaca": {"messages": "messages", "instruction": "instruction", "input": "input",
               "output": "output"},
    "openai": {"messages": "messages"},
}


def typed_fields(record_type: str, fields: Any) -> Any:
    """`fields` as given, over the defaults of the record type (`fields` type: as given, or
    {text: text}); sharegpt's roles merge over SHAREGPT_ROLES."""
    if not isinstance(fields, dict):
        return TYPE_FIELDS[record_type] if fields is None else fields
    if record_type == "fields":
        return fields
    defaults = dict(TYPE_FIELDS[record_type])
    if any(k in fields for k in TRAINING_ROLES):  # check_record_type names what is wrong
        defaults.pop("messages")
    merged = {**defaults, **fields}
    if record_type == "sharegpt" and isinstance(fields.get("roles", {}), dict):
        merged["roles"] = {**SHAREGPT_ROLES, **fields.get("roles", {})}
    return merged


def check_record_type(record_type: str, fields: FieldsSpec, where: str) -> None:
    """The type's keys only with that type; conversation types only with fields.messages."""
    own_keys: dict[str, tuple[str, ...]] = {"sharegpt": SHAREGPT_KEYS, "alpaca": ALPACA_KEYS}
    for owner, keys in own_keys.items():
        stray = [k for k in keys if getattr(fields, k) is not None and record_type != owner]
        if stray:
            raise ValueError(f"{where}fields.{stray[0]} applies only to type {owner}")
    if record_type != "fields" and fields.layout != "messages":
        keys = own_keys.get(record_type, ())
        raise ValueError(f"{where}type {record_type} makes conversations: fields may name "
                         f"{', '.join(('messages', *keys))} only (got "
                         f"{'+'.join(sorted(fields.signal))})")


def _with_type_defaults(data: Any, default_type: str = "fields") -> Any:
    if isinstance(data, dict):
        record_type = data.get("type", default_type)
        if record_type in TYPE_FIELDS and ("fields" in data or record_type != "fields"):
            data = {**data, "fields": typed_fields(record_type, data.get("fields"))}
    return data


HF_DATASETS = "hf://datasets/"


def hub_repo(value: str) -> tuple[str, str | None] | None:
    """(repo id, revision in the path) when `value` names a Hub dataset repository without a
    file (hf://datasets/<org>/<name>[@<revision>]); None otherwise."""
    if not value.startswith(HF_DATASETS):
        return None
    parts = value[len(HF_DATASETS):].rstrip("/").split("/")
    if len(parts) != 2 or not all(parts):
        return None
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None


def check_data_path(value: str) -> str:
    """A Hub dataset path names a repository, hf://datasets/<org>/<name>[@<revision>] (read
    through `datasets` with a split), or a file in one: .../<name>[@<revision>]/<file>."""
    if value.startswith(HF_DATASETS):
        parts = value[len(HF_DATASETS):].rstrip("/").split("/")
        if len(parts) < 2 or not all(parts[:2]):
            raise ValueError(f"{value!r} names no repository: use hf://datasets/<org>/<name> "
                             f"with a split, or hf://datasets/<org>/<name>/<file>")
    return value


def check_hub_source(prefix: str, path: str, config: str | None, split: str | None,
                     revision: str | None, split_field: str = "split") -> None:
    """The Hub fields fit the path: a repository needs a split (else there is nothing to
    read), config and split apply to repositories only, revision to hf:// paths only.
    `prefix`: how messages name the fields' parent ("dataset." or "" for a mixture source,
    whose errors carry its location)."""
    repo = hub_repo(path)
    if repo is not None and split is None:
        example = "test" if split_field == "evalSplit" else "train"
        raise ValueError(f"{path!r} names no file and no split: set {prefix}{split_field} "
                         f"(e.g. {example}) to read the repository through `datasets`, or name a "
                         f"file ({path.rstrip('/')}/train.jsonl)")
    if repo is None:
        for name, value in (("config", config), (split_field, split)):
            if value is not None:
                raise ValueError(f"{prefix}{name} applies to a Hub dataset repository "
                                 f"(hf://datasets/<org>/<name>), not to {path!r}")
    if revision is not None:
        if not path.startswith(HF_DATASETS):
            raise ValueError(f"{prefix}revision applies to hf://datasets/ paths, not to "
                             f"{path!r}")
        if "@" in path[len(HF_DATASETS):].split("/")[1]:
            raise ValueError(f"{prefix}revision: {path!r} names a revision already (@)")


def with_revision(path: str, revision: str | None) -> str:
    """hf://datasets/<org>/<name>/<file> at `revision` (HfFileSystem's <name>@<revision>)."""
    if revision is None or not path.startswith(HF_DATASETS):
        return path
    org, name, *rest = path[len(HF_DATASETS):].split("/")
    return HF_DATASETS + "/".join([org, f"{name}@{revision}", *rest])


HUB_DATA_FIELDS = {
    "config": "Hub dataset repository path: the configuration (subset) to read, as "
    "datasets.load_dataset's name.",
    "split": "Hub dataset repository path: the split to read, whole (train, test, ...); "
    "required with hf://datasets/<org>/<name>.",
    "revision": "hf://datasets/ path: the branch, tag or commit to read (default: main).",
}


def _inherit(dataset: dict[str, Any], source: Any) -> Any:
    """A mixture source without its own type, format or fields takes the dataset's (fields
    only when the types agree: another type has other defaults)."""
    if not isinstance(source, dict):
        return source
    inherited: dict[str, Any] = {k: dataset[k] for k in ("type", "format") if k in dataset}
    same_type = source.get("type", dataset.get("type", "fields")) == dataset.get("type", "fields")
    if "fields" in dataset and same_type:
        inherited["fields"] = dataset["fields"]
    return {**inherited, **source}


class SourceSpec(SpecModel):
    """One source of a mixture (dataset.train as a list)."""

    path: str = Field(min_length=1, max_length=MAX_URI,
                      description="The data: local path, file://, s3://, gs:// "
                      "or hf://datasets/<id>/<file>.")
    type: RecordType = Field("fields", description="Record shape (default: dataset.type).")
    format: FileFormat = Field("auto", description="File format (default: dataset.format).")
    fields: FieldsSpec = Field(default_factory=lambda: FieldsSpec(text="text"),
                               description="Record fields (default: dataset.fields, or the "
                               "type's defaults).")
    weight: float | None = Field(
        None, gt=0, description="Examples taken per epoch, as a multiple of the source's size "
        "(0.5: a random half, 2: every record twice). Default 1.")
    samples: int | None = Field(None, ge=1, description="Examples taken per epoch, as a "
                                "number (instead of weight); above the size, records repeat.")
    config: str | None = Field(None, min_length=1, max_length=MAX_SHORT,
                               description=HUB_DATA_FIELDS["config"])
    split: str | None = Field(None, min_length=1, max_length=MAX_SHORT,
                              description=HUB_DATA_FIELDS["split"])
    revision: str | None = Field(None, min_length=1, max_length=MAX_SHORT,
                                 description=HUB_DATA_FIELDS["revision"])

    @model_validator(mode="before")
    @classmethod
    def _type_defaults(cls, data: Any) -> Any:
        return _with_type_defaults(data)

    @field_validator("path")
    @classmethod
    def _names_a_file(cls, value: str) -> str:
        return check_data_path(value)

    @model_validator(mode="after")
    def _check(self) -> SourceSpec:
        if self.weight is not None and self.samples is not None:
            raise ValueError("set weight or samples, not both")
        check_record_type(self.type, self.fields, "")
        check_hub_source("", self.path, self.config, self.split, self.revision)
        if self.is_hub_repo and self.format != "auto":
            raise ValueError(f"format {self.format} applies to files; the repository "
                             f"{self.path} is read by `datasets` (leave format auto)")
        return self

    @property
    def is_hub_repo(self) -> bool:
        """A Hub dataset repository, read through `datasets` (not a file)."""
        return hub_repo(self.path) is not None

    @property
    def read_path(self) -> str:
        """The file path as storage opens it (a Hub file at `revision`)."""
        return with_revision(self.path, self.revision)

    @property
    def label(self) -> str:
        """How messages and the manifest name the source."""
        extra = [f"{k} {v}" for k, v in (("config", self.config), ("split", self.split),
                                         ("revision", self.revision)) if v is not None]
        return f"{self.path} ({', '.join(extra)})" if extra else self.path

    def taken(self, count: int) -> int:
        """How many examples this source gives the mixture out of its `count` records."""
        if self.samples is not None:
            return self.samples
        return max(1, round(count * (1.0 if self.weight is None else self.weight)))


class DatasetSpec(SpecModel):
    train: (Annotated[str, Field(min_length=1, max_length=MAX_URI)]
            | Annotated[list[SourceSpec], Field(min_length=1, max_length=MAX_ITEMS)]) = Field(
        description="Training data: local path, file://, s3://, gs:// or "
        "hf://datasets/<id>/<file>; or a mixture: a list of sources {path, type, format, "
        "fields, weight | samples}.")
    eval: str | None = Field(None, max_length=MAX_URI,
                             description="Evaluation data (same forms as train).")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Hold out this fraction of train for evaluation when eval "
        "is not given."
    )
    format: FileFormat = Field(
        "auto", description="File format; auto picks it from the file extension."
    )
    type: RecordType = Field(
        "fields", description="Record shape: fields (the roles in fields), sharegpt "
        "({conversations: [{from, value}]}), alpaca ({instruction, input, output}), openai "
        "(chat JSONL {messages: [{role, content}]}). sharegpt, alpaca and openai become "
        "conversations rendered with the chat template."
    )
    fields: FieldsSpec = Field(default_factory=lambda: FieldsSpec(text="text"),
                               description="Record fields to train on.")
    config: str | None = Field(None, min_length=1, max_length=MAX_SHORT,
                               description=HUB_DATA_FIELDS["config"] + " Applies to train "
                               "(a path) and eval.")
    split: str | None = Field(None, min_length=1, max_length=MAX_SHORT,
                              description=HUB_DATA_FIELDS["split"] + " Applies to train (a "
                              "path); mixture sources have their own.")
    eval_split: str | None = Field(None, min_length=1, max_length=MAX_SHORT,
                                   description="The split eval reads when eval is a Hub "
                                   "dataset repository path (e.g. test).")
    revision: str | None = Field(None, min_length=1, max_length=MAX_SHORT,
                                 description=HUB_DATA_FIELDS["revision"] + " Applies to train "
                                 "(a path) and eval.")
    max_seq_length: int = Field(1024, ge=8, description="Tokens per sequence (longer is cut).")
    packing: bool = Field(False, description="Concatenate causal-LM examples into full "
                          "maxSeqLength blocks (no padding).")
    add_special_tokens: list[Short] = Field(
        default_factory=list, max_length=MAX_ITEMS,
        description="New special tokens added to the tokenizer (e.g. "
        "[<|tool|>]); the model's embeddings are resized to match. With lora/qlora, list the "
        "embedding and output modules in method.lora.modulesToSave so the new rows train."
    )
    chat_template: str | None = Field(
        None, max_length=MAX_TEXT, min_length=1,
        description="Chat template for fields.messages, overriding the "
        "tokenizer's: inline Jinja, or a built-in name (" + ", ".join(CHAT_TEMPLATE_NAMES)
        + ")."
    )

    @model_validator(mode="before")
    @classmethod
    def _type_defaults(cls, data: Any) -> Any:
        data = _with_type_defaults(data)
        if isinstance(data, dict) and isinstance(data.get("train"), list):
            data = {**data, "train": [_inherit(data, s) for s in data["train"]]}
        return data

    @field_validator("train", "eval")
    @classmethod
    def _names_a_file(cls, value: Any) -> Any:
        return check_data_path(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _hub_fields_fit_the_paths(self) -> DatasetSpec:
        """Each of config, split, evalSplit, revision applies to a path that can use it
        (train's, when it is a path, and eval's); one that applies to neither is an error."""
        paths = [p for p in (self.train if isinstance(self.train, str) else None, self.eval)
                 if p is not None]
        if isinstance(self.train, str):
            self._check_path(self.train, self.split, "split")
        elif self.split is not None:
            raise ValueError("dataset.split applies to a train path; give each mixture source "
                             "its own split")
        if self.eval is not None:
            self._check_path(self.eval, self.eval_split, "evalSplit")
        elif self.eval_split is not None:
            raise ValueError("dataset.evalSplit applies to an eval path (none is set)")
        if self.config is not None and not any(hub_repo(p) for p in paths):
            raise ValueError("dataset.config applies to a Hub dataset repository path "
                             "(hf://datasets/<org>/<name>) in train or eval; there is none")
        if self.revision is not None and not any(p.startswith(HF_DATASETS) for p in paths):
            raise ValueError("dataset.revision applies to hf://datasets/ paths in train or "
                             "eval; there is none")
        return self

    def _check_path(self, path: str, split: str | None, split_field: str) -> None:
        check_hub_source("dataset.", path, None, split,
                         self.revision if path.startswith(HF_DATASETS) else None, split_field)
        if hub_repo(path) and self.format != "auto":
            raise ValueError(f"dataset.format {self.format} applies to files; the repository "
                             f"{path} is read by `datasets` (leave format auto)")

    @property
    def eval_source(self) -> SourceSpec | None:
        if self.eval is None:
            return None
        return self._source(self.eval, self.eval_split)

    def _source(self, path: str, split: str | None) -> SourceSpec:
        """`path` with the dataset's record settings and the Hub fields that apply to it."""
        return SourceSpec(path=path, type=self.type, format=self.format, fields=self.fields,
                          config=self.config if hub_repo(path) else None, split=split,
                          revision=self.revision if path.startswith(HF_DATASETS) else None)

    @model_validator(mode="after")
    def _mixture_is_one_layout(self) -> DatasetSpec:
        check_record_type(self.type, self.fields, "")
        if not isinstance(self.train, list):
            return self
        first = self.train[0].fields
        if "fields" not in self.model_fields_set:  # the mixture's roles, named after themselves
            self.fields = FieldsSpec(**{role: role for role in first.signal})
        for i, source in enumerate(self.train):
            if source.fields.layout != self.fields.layout:
                raise ValueError(f"train[{i}]: fields {source.fields.layout} differ from the "
                                 f"mixture's {self.fields.layout}; every source must give "
                                 f"the same training roles")
        return self

    @property
    def sources(self) -> list[SourceSpec]:
        """The training sources: the mixture, or the one `train` file with the dataset's
        type, format and fields."""
        if isinstance(self.train, list):
            return self.train
        return [self._source(self.train, self.split)]

    @property
    def train_name(self) -> str:
        """How messages name the training data."""
        if isinstance(self.train, str):
            return self.train
        return "the mixture of " + ", ".join(s.path for s in self.train)

    @model_validator(mode="after")
    def _chat_template_is_jinja_or_a_name(self) -> DatasetSpec:
        template = self.chat_template
        if template is None:
            return self
        if not self.fields.messages:
            raise ValueError("chatTemplate applies only with fields.messages")
        if template not in CHAT_TEMPLATE_NAMES and "{{" not in template and "{%" not in template:
            raise ValueError(f"chatTemplate {template!r} is neither Jinja nor a built-in name "
                             f"({', '.join(CHAT_TEMPLATE_NAMES)})")
        return self


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
class Objective(StrEnum):
    SFT = "sft"
    DPO = "dpo"
    ORPO = "orpo"


class PreferenceSpec(SpecModel):
    """How preference pairs are turned into a loss (training.objective dpo or orpo)."""

    beta: float = Field(
        0.1, gt=0, description="dpo: strength of the pull toward the reference model (lower "
        "lets the policy move further from it; 0.1 is the DPO paper's value). orpo: weight "
        "lambda of the odds-ratio term added to the chosen responses' SFT loss."
    )
    loss: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="dpo only: sigmoid = the DPO paper's loss; ipo = squared loss "
        "toward a margin of 1/(2*beta), less prone to overfitting near-deterministic "
        "preferences; hinge = SLiC's hinge loss on the reward margin."
    )


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
        default_factory=dict, max_length=MAX_PROPERTIES,
        description="Keys deep-merged over the generated DeepSpeed config "
        "(deepspeed-*) or FSDP config (fsdp), e.g. {zero_optimization: {offload_optimizer: "
        "{device: cpu}}}.")
    collective_timeout_seconds: int = Field(
        3600, ge=60, le=86400,
        description="How long a rank waits in a collective (all-reduce, barrier, broadcast) "
        "before the job fails: the process group's timeout under every strategy. Covers rank "
        "0 uploading a checkpoint while the others wait, and the resume download; raise it "
        "when one checkpoint takes longer than this to write and upload.")
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
        default_factory=list, max_length=MAX_ITEMS,
        description="Experiment trackers. tensorboard event files are "
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

    objective: Objective = Field(
        Objective.SFT, description="sft: next-token loss on the data; dpo: Direct Preference "
        "Optimization on chosen/rejected pairs against a frozen reference (the base model); "
        "orpo: Odds-Ratio Preference Optimization (SFT on chosen plus an odds-ratio penalty on "
        "rejected, no reference model). dpo and orpo need task causal-lm and dataset.fields "
        "chosen+rejected (with prompt, or as messages).")
    preference: PreferenceSpec | None = Field(
        None, description="Preference loss settings (objectives dpo and orpo; defaults apply "
        "when omitted).")

    @model_validator(mode="after")
    def _check_preference(self) -> TrainingSpec:
        if self.objective == Objective.SFT:
            if self.preference is not None:
                raise ValueError("preference applies to objective dpo or orpo only")
            return self
        if self.preference is None:
            self.preference = PreferenceSpec()
        if self.objective == Objective.ORPO and self.preference.loss != "sigmoid":
            raise ValueError("preference.loss applies to objective dpo only (orpo has one loss)")
        if self.pretrain:
            raise ValueError(f"pretrain does not apply to objective {self.objective}: "
                             "preference tuning starts from a trained model")
        return self


class ResourcesSpec(SpecModel):
    nodes: int = Field(1, ge=1, description="Pods in the torchrun gang (one per node).")
    gpus_per_node: int = Field(1, ge=0, description="GPUs per pod = torchrun processes per "
                               "node (0 = one CPU process).")
    gpu_resource: str = Field(
        "nvidia.com/gpu", max_length=253, pattern=EXTENDED_RESOURCE,
        description="Extended resource that gpusPerNode requests: nvidia.com/gpu, a MIG slice "
        "(nvidia.com/mig-1g.10gb), amd.com/gpu, habana.ai/gaudi, ...")
    extra_resources: dict[str, int] = Field(
        default_factory=dict, max_length=MAX_PROPERTIES,
        description="More extended resources per pod, requested and "
        "limited alike (e.g. {rdma/hca_shared_devices_a: 1} for RDMA).")

    @model_validator(mode="after")
    def _check(self) -> ResourcesSpec:
        for name, count in self.extra_resources.items():
            if not re.match(EXTENDED_RESOURCE, name) or name.startswith("kubernetes.io/"):
                raise ValueError(f"extraResources.{name}: not an extended resource name "
                                 "(<domain>/<name>, e.g. rdma/hca_shared_devices_a)")
            if name == self.gpu_resource:
                raise ValueError(f"extraResources.{name}: the GPU resource is requested by "
                                 "gpusPerNode")
            if count < 1:
                raise ValueError(f"extraResources.{name}: must be at least 1 (got {count})")
        return self


# Volume sources Pod Security "restricted" allows (no hostPath, nfs, iscsi, ...).
VOLUME_SOURCES = {"persistentVolumeClaim": "claimName", "configMap": "name",
                  "secret": "secretName", "emptyDir": None, "csi": "driver", "ephemeral": None,
                  "projected": None, "downwardAPI": None}
# Names of the volumes the operator adds to every pod.
RESERVED_VOLUMES = frozenset({"config", "dshm", "tmp", "hf-home", "hf-cache", "hf-token",
                              "image-output", "home-cache", "storage-credentials",
                              "oci-credentials"})
# Pod labels and annotations the operator, the Job controller or Kueue set or read.
RESERVED_LABEL_PREFIXES = ("kubetune.dev/", "batch.kubernetes.io/", "app.kubernetes.io/",
                           "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")
RESERVED_LABELS = frozenset({"job-name", "controller-uid"})
RESERVED_ANNOTATION_PREFIXES = ("kubetune.dev/", "batch.kubernetes.io/",
                                "kubectl.kubernetes.io/default-container")
# Environment the launch contract and the Hub client depend on (docs/contract.md).
# Endpoint variables too: where the Hub token and the storage keys are sent (botocore reads
# AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_<SERVICE>); an endpoint is spec.storage.endpointUrl.
RESERVED_ENV_PREFIXES = ("PET_", "KUBETUNE_", "AWS_ENDPOINT_URL")
RESERVED_ENV = frozenset({"HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "HF_TOKEN_PATH",
                          "TMPDIR", "HF_ENDPOINT", "STORAGE_EMULATOR_HOST"})
QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


class PodVolume(SpecModel):
    """A pod volume (core/v1 Volume) of a type Pod Security "restricted" allows."""

    name: str = Field(max_length=63, pattern=DNS_LABEL, description="Volume name.")
    persistent_volume_claim: dict[str, Any] | None = Field(None, max_length=MAX_PROPERTIES,
                                                           description="core/v1 "
                                                           "PersistentVolumeClaimVolumeSource.")
    config_map: dict[str, Any] | None = Field(None, max_length=MAX_PROPERTIES,
                                              description="core/v1 "
                                              "ConfigMapVolumeSource.")
    secret: dict[str, Any] | None = Field(None, max_length=MAX_PROPERTIES,
                                          description="core/v1 SecretVolumeSource.")
    empty_dir: dict[str, Any] | None = Field(None, max_length=MAX_PROPERTIES,
                                             description="core/v1 EmptyDirVolumeSource.")
    csi: dict[str, Any] | None = Field(None, max_length=MAX_PROPERTIES,
                                       description="core/v1 CSIVolumeSource.")
    ephemeral: dict[str, Any] | None = Field(None, max_length=MAX_PROPERTIES, description="core/v1 "
                                             "EphemeralVolumeSource.")
    projected: dict[str, Any] | None = Field(None, max_length=MAX_PROPERTIES, description="core/v1 "
                                             "ProjectedVolumeSource.")
    downward_api: dict[str, Any] | None = Field(None, max_length=MAX_PROPERTIES,
                                                alias="downwardAPI",
                                                description="core/v1 DownwardAPIVolumeSource.")

    @model_validator(mode="before")
    @classmethod
    def _allowed_type(cls, data: Any) -> Any:
        if isinstance(data, dict):
            others = sorted(k for k in data if k != "name" and k not in VOLUME_SOURCES)
            if others:
                raise ValueError(f"volume type {others[0]} is not allowed; use one of "
                                 + ", ".join(VOLUME_SOURCES) + " (Pod Security restricted)")
        return data

    @model_validator(mode="after")
    def _one_source(self) -> PodVolume:
        sources = self.sources()
        if len(sources) != 1:
            raise ValueError(f"volume {self.name} needs exactly one source of "
                             + ", ".join(VOLUME_SOURCES) + f" (got {len(sources)})")
        [(kind, body)] = sources.items()
        required = VOLUME_SOURCES[kind]
        if required and not body.get(required):
            raise ValueError(f"volume {self.name}: {kind}.{required} is required")
        return self

    def sources(self) -> dict[str, dict[str, Any]]:
        dumped = self.model_dump(by_alias=True, exclude={"name"})
        return {k: v for k, v in dumped.items() if v is not None}

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, **self.sources()}


class PodVolumeMount(SpecModel):
    name: str = Field(max_length=MAX_NAME, description="A volume of spec.pod.volumes.")
    mount_path: str = Field(max_length=MAX_SHORT, min_length=2,
                            description="Absolute path in the trainer container "
                            "(not one the operator mounts: /etc/kubetune, /tmp, /dev/shm, "
                            "/var/cache/kubetune, /var/run/secrets/kubetune, /opt/kubetune/out, "
                            "/home/kubetune/.cache).")
    read_only: bool = Field(False, description="Mount read-only.")
    sub_path: str | None = Field(None, max_length=MAX_SHORT,
                                 description="Path within the volume to mount.")

    @model_validator(mode="after")
    def _check(self) -> PodVolumeMount:
        path = posixpath.normpath(self.mount_path)
        if not self.mount_path.startswith("/"):
            raise ValueError(f"mountPath {self.mount_path!r} must be absolute")
        for reserved in contract.RESERVED_MOUNT_PATHS:
            inside = path == reserved or path.startswith(reserved + "/")
            if inside or reserved.startswith(path.rstrip("/") + "/"):
                raise ValueError(f"mountPath {self.mount_path} overlaps {reserved}, which the "
                                 "operator mounts itself")
        if self.sub_path and (self.sub_path.startswith("/") or ".." in self.sub_path.split("/")):
            raise ValueError(f"subPath {self.sub_path!r} must be relative, without '..'")
        return self

    def manifest(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class KeyRef(SpecModel):
    name: str = Field(max_length=MAX_NAME, min_length=1, description="Secret or ConfigMap name.")
    key: str = Field(max_length=MAX_NAME, min_length=1, description="Key within it.")
    optional: bool = Field(False, description="Leave the variable unset when missing.")


class EnvValueSource(SpecModel):
    secret_key_ref: KeyRef | None = Field(None, description="A key of a Secret.")
    config_map_key_ref: KeyRef | None = Field(None, description="A key of a ConfigMap.")

    @model_validator(mode="after")
    def _one(self) -> EnvValueSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("valueFrom needs exactly one of secretKeyRef, configMapKeyRef")
        return self


class EnvValueFrom(SpecModel):
    value_from: EnvValueSource = Field(description="Where the value comes from.")


class EnvFromRef(SpecModel):
    name: str = Field(max_length=MAX_NAME, min_length=1, description="Secret or ConfigMap name.")
    optional: bool = Field(False, description="Start even when it is missing.")


class EnvFromSpec(SpecModel):
    secret_ref: EnvFromRef | None = Field(None, description="Every key of a Secret.")
    config_map_ref: EnvFromRef | None = Field(None, description="Every key of a ConfigMap.")
    prefix: str | None = Field(None, max_length=MAX_NAME,
                               description="Prefix added to every variable name.")

    @model_validator(mode="after")
    def _one(self) -> EnvFromSpec:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("envFrom entries need exactly one of secretRef, configMapRef")
        return self

    def manifest(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


def _check_metadata(kind: str, values: dict[str, str], prefixes: tuple[str, ...],
                    exact: frozenset[str] = frozenset(), check_value: bool = True) -> None:
    for key, value in values.items():
        if key in exact or key.startswith(prefixes):
            raise ValueError(f"{kind}.{key}: reserved (the operator, the Job controller or "
                             "Kueue sets it; put Kueue labels on the FineTuneJob itself)")
        if not QUALIFIED_NAME.match(key) or len(key) > 316:
            raise ValueError(f"{kind}.{key}: not a valid key ([prefix/]name)")
        if check_value and not LABEL_VALUE.match(value):
            raise ValueError(f"{kind}.{key}: value {value!r} is not a valid label value "
                             "(63 characters: letters, digits, '-', '_', '.')")


class PodSpec(SpecModel):
    """Where and how the gang's pods run (copied into every pod of the Job)."""

    image: str | None = Field(None, max_length=MAX_URI,
                              description="Trainer image (default: the operator's "
                              "configured trainer image).")
    image_pull_secrets: list[Name] = Field(default_factory=list, max_length=MAX_ITEMS,
                                           description="Secret names "
                                          "for pulling the image.")
    node_selector: dict[str, Name] = Field(default_factory=dict, max_length=MAX_PROPERTIES,
                                           description="Node labels the "
                                          "pods require.")
    tolerations: list[Structure] = Field(default_factory=list, max_length=MAX_ITEMS,
                                         description="Pod "
                                              "tolerations (core/v1 Toleration).")
    affinity: dict[str, Any] | None = Field(None, max_length=MAX_PROPERTIES,
                                            description="Pod affinity (core/v1 Affinity).")
    priority_class_name: str | None = Field(None, max_length=MAX_NAME,
                                            description="PriorityClass of the pods.")
    scheduler_name: str | None = Field(None, max_length=MAX_NAME,
                                       description="Scheduler for the pods. Gang "
                                       "schedulers get a PodGroup per attempt: volcano "
                                       "(Volcano) and scheduler-plugins-scheduler "
                                       "(coscheduling).")
    cpu: str | None = Field(None, max_length=MAX_NAME,
                            description="CPU request and limit per pod (e.g. '8').")
    memory: str | None = Field(None, max_length=MAX_NAME,
                               description="Memory request and limit per pod "
                               "(e.g. '64Gi').")
    shm_size: str = Field("8Gi", max_length=MAX_NAME,
                          description="Size of the in-memory /dev/shm volume.")
    env: dict[str, Text | EnvValueFrom] = Field(
        default_factory=dict, max_length=MAX_ENV,
        description="Extra environment variables for the trainer: a "
        "string, or {valueFrom: {secretKeyRef|configMapKeyRef: {name, key}}}.")
    env_from: list[EnvFromSpec] = Field(default_factory=list, max_length=MAX_ITEMS,
                                        description="Secrets and "
                                        "ConfigMaps whose keys all become variables.")
    volumes: list[PodVolume] = Field(default_factory=list, max_length=MAX_ITEMS,
                                     description="Pod volumes: "
                                     "persistentVolumeClaim, configMap, secret, emptyDir, csi, "
                                     "ephemeral, projected or downwardAPI.")
    volume_mounts: list[PodVolumeMount] = Field(default_factory=list, max_length=MAX_ITEMS,
                                                description="Mounts of "
                                                "those volumes in the trainer container.")
    labels: dict[str, Name] = Field(default_factory=dict, max_length=MAX_PROPERTIES,
                                    description="Extra pod labels.")
    annotations: dict[str, Text] = Field(default_factory=dict, max_length=MAX_PROPERTIES,
                                         description="Extra pod "
                                        "annotations (Multus networks, Kueue topology, ...).")

    @field_validator("env", mode="before")
    @classmethod
    def _env_values(cls, value: Any) -> Any:
        """One clear message per variable instead of pydantic's one per union member."""
        if not isinstance(value, dict):
            return value
        for name, item in value.items():
            if isinstance(item, dict):
                try:
                    EnvValueFrom.model_validate(item)
                except ValidationError as exc:
                    problems = "; ".join(str(e["msg"]).removeprefix("Value error, ")
                                         for e in exc.errors())
                    raise ValueError(f"env.{name}: {problems}") from None
            elif not isinstance(item, str):
                raise ValueError(f"env.{name}: a string or {{valueFrom: ...}} (got "
                                 f"{item!r}; quote numbers and booleans)")
        return value

    @model_validator(mode="after")
    def _check(self) -> PodSpec:
        for name, value in self.env.items():
            if isinstance(value, str) and looks_like_credential(value):
                raise ValueError(f"env.{name}: the value looks like a credential; put it in a "
                                 "Secret and use {valueFrom: {secretKeyRef: {name, key}}} "
                                 "(plain values are copied into the Job and the manifest)")
            if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES):
                hint = " (use model.tokenSecret)" if name.startswith("HF_TOKEN") else ""
                raise ValueError(f"env.{name}: reserved for the operator's launch contract"
                                 + hint)
        names = [v.name for v in self.volumes]
        for name in names:
            if name in RESERVED_VOLUMES:
                raise ValueError(f"volumes: name {name} is reserved for the operator's own")
            if names.count(name) > 1:
                raise ValueError(f"volumes: name {name} is used twice")
        paths = [m.mount_path for m in self.volume_mounts]
        for mount in self.volume_mounts:
            if mount.name not in names:
                raise ValueError(f"volumeMounts: {mount.name} is not in pod.volumes")
            if paths.count(mount.mount_path) > 1:
                raise ValueError(f"volumeMounts: {mount.mount_path} is mounted twice")
        _check_metadata("labels", self.labels, RESERVED_LABEL_PREFIXES, RESERVED_LABELS)
        _check_metadata("annotations", self.annotations, RESERVED_ANNOTATION_PREFIXES,
                        check_value=False)
        return self


class StorageSpec(SpecModel):
    """Object-storage access for dataset, checkpoints and output."""

    secret_name: str | None = Field(None, max_length=MAX_NAME,
                                    description="Secret mounted as files (never "
                                    "environment variables): AWS_ACCESS_KEY_ID + "
                                    "AWS_SECRET_ACCESS_KEY or an AWS `credentials` file, a GCS "
                                    "`key.json`; default: the operator's configured storage "
                                    "Secret; none: the service account's workload identity.")
    endpoint_url: str | None = Field(None, max_length=MAX_URI,
                                     description="S3 endpoint for MinIO/Ceph/other "
                                     "S3-compatible stores.")
    region: str | None = Field(None, max_length=MAX_NAME, description="S3 region.")

    @field_validator("endpoint_url")
    @classmethod
    def _no_userinfo(cls, value: str | None) -> str | None:
        if value and "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("credentials in the URL (user@host) are copied into the Job and "
                             "the manifest; put them in the Secret of spec.storage.secretName")
        return value


class MetricsSpec(SpecModel):
    port: int = Field(9400, ge=1024, le=65535, description="Port of each rank's Prometheus "
                      "/metrics (rank r listens on port + local rank).")


class SamplesSpec(SpecModel):
    prompts: list[Text] = Field(max_length=MAX_ITEMS, min_length=1,
                                description="Prompts to complete with the "
                               "trained model (greedy decoding).")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Tokens generated per prompt.")


# A Hub repository id: <owner>/<name> (huggingface_hub's validate_repo_id: letters, digits,
# '-', '_', '.'; no '--' or '..'; names up to 96 characters).
HUB_REPO = r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,95}/[A-Za-z0-9][-A-Za-z0-9_.]{0,95}$"
# A branch name (no spaces, no leading '-'); '..' and pull-request refs are refused below (the
# CRD's patterns are RE2: no lookaheads).
HUB_BRANCH = r"^[A-Za-z0-9_][-A-Za-z0-9_./]*$"


class PushToHubSpec(SpecModel):
    """Publish the result to a Hugging Face Hub model repository after it is in object
    storage (docs/trainer.md, "Pushing to the Hub")."""

    repo: str = Field(max_length=MAX_NAME, pattern=HUB_REPO,
                      description="Model repository <owner>/<name>, created when missing.")
    private: bool = Field(True, description="Create the repository private (the default: "
                          "a model trained on your data is not published by accident). An "
                          "existing repository keeps its visibility.")
    revision: str | None = Field(
        None, max_length=MAX_SHORT, pattern=HUB_BRANCH,
        description="Branch to commit to, created from the default branch when missing "
        "(default: main).")
    token_secret: TokenSecretSpec | None = Field(
        None, description="Secret key with a Hub token that may write to repo (default: "
        "model.tokenSecret's). Mounted as a file, like model.tokenSecret.")

    @field_validator("repo")
    @classmethod
    def _no_double_separators(cls, value: str) -> str:
        if "--" in value or ".." in value:
            raise ValueError(f"{value!r}: a Hub repository name has no '--' or '..'")
        return value

    @field_validator("revision")
    @classmethod
    def _a_branch(cls, value: str | None) -> str | None:
        if value and (".." in value or value.startswith("refs/") or value.endswith("/")):
            raise ValueError(f"{value!r} is not a branch name (no '..', no refs/, no "
                             "trailing '/')")
        return value
SHARD_SIZE = r"^[1-9][0-9]*(KB|MB|GB|KiB|MiB|GiB)$"
_SHARD_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20,
                "GiB": 2**30}


def shard_size_bytes(text: str) -> int:
    """output.maxShardSize in bytes ("5GB" -> 5 * 10**9, "2GiB" -> 2 * 2**30)."""
    match = re.fullmatch(SHARD_SIZE, text)
    if match is None:
        raise ValueError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    return int(text[:match.start(1)]) * _SHARD_UNITS[match[1]]


class OciOutputSpec(SpecModel):
    """Also push the published artifact to an OCI registry (docs/storage.md#oci-registries)."""

    reference: str = Field(max_length=MAX_URI, min_length=1,
                           description="Where to push: registry.example.com[:port]/"
                           "repository[:tag] (tag default latest; the registry host is "
                           "never implied). The manifest digest pushed is recorded in "
                           "status.output.oci.digest.")
    secret_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN,
                                    description="Secret of type kubernetes.io/dockerconfigjson "
                                    "(kubectl create secret docker-registry) with the registry's "
                                    "credentials, mounted as a file; none: push anonymously.")
    plain_http: bool = Field(False, description="Talk plain HTTP to the registry instead of "
                             "HTTPS (a registry on loopback or inside the cluster without "
                             "TLS; ORAS' --plain-http).")

    @field_validator("reference")
    @classmethod
    def _reference(cls, value: str) -> str:
        parse_reference(value)
        return value


class OutputSpec(SpecModel):
    uri: str = Field(max_length=MAX_URI, min_length=1,
                     description="Where the adapter or model is written: path, "
                     "file://, s3:// or gs://.")
    merge_adapter: bool = Field(False, description="Also write the base model with the adapter "
                                "merged in (under merged/).")
    samples: SamplesSpec | None = Field(
        None, description="Generate from the trained model (adapter applied) after training "
        "and publish samples.jsonl with the artifact (causal-lm and seq2seq-lm).")
    push_to_hub: PushToHubSpec | None = Field(
        None, description="Also publish the adapter (the merged model with mergeAdapter) to a "
        "Hugging Face Hub model repository, from rank 0 after the artifact is in object "
        "storage.")
    oci: OciOutputSpec | None = Field(
        None, description="After the artifact is written to uri, rank 0 pushes the same files "
        "to an OCI registry as an ORAS-compatible artifact (one layer per file).")
    max_shard_size: str = Field(
        "5GB", max_length=32, pattern=SHARD_SIZE,
        description="Largest safetensors file of a whole model written (merged/ under "
        "mergeAdapter, the output of method full): bigger models are split into "
        "model-0000k-of-0000n.safetensors shards with model.safetensors.index.json. KB/MB/GB "
        "are powers of 1000, KiB/MiB/GiB of 1024; under output.oci each file is one layer, "
        "which registries limit (e.g. 10GB).")

    @property
    def max_shard_bytes(self) -> int:
        return shard_size_bytes(self.max_shard_size)


class CheckpointSpec(SpecModel):
    uri: str | None = Field(None, max_length=MAX_URI, description="Checkpoint location (default "
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
    scheduling_timeout_seconds: int = Field(
        600, ge=1, description="Tear the attempt down (and retry with backoff) when not every "
        "rank runs this long after its pods were created: a partial gang never holds GPUs.")
    stall_timeout_seconds: int | None = Field(
        None, ge=1, description="Restart the gang from its last checkpoint when rank 0's step "
        "has not advanced for this long while training (default: off).")


RUNTIME_KIND = "FineTuneRuntime"
CLUSTER_RUNTIME_KIND = "ClusterFineTuneRuntime"


class RuntimeRef(SpecModel):
    """A runtime curated by the cluster's admins (docs/runtimes.md)."""

    kind: Literal["ClusterFineTuneRuntime", "FineTuneRuntime"] = Field(
        "ClusterFineTuneRuntime", description="ClusterFineTuneRuntime (cluster-wide) or "
        "FineTuneRuntime (in the job's namespace).")
    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                      description="The runtime's name.")


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
    runtime_ref: RuntimeRef | None = Field(
        None, description="Runtime curated by admins: its image, placement and defaults apply, "
        "and its policy limits this job (the job may only narrow it; docs/runtimes.md).")

    @model_validator(mode="after")
    def _check(self) -> FineTuneJobSpec:
        task, layout = self.model.task, self.dataset.fields.layout
        self._check_objective()
        allowed = TASK_LAYOUTS[Task(task)]
        if layout not in allowed:
            raise ValueError(f"dataset.fields {layout} does not fit task {task} "
                             f"(use {' or '.join(allowed)})")
        if self.dataset.packing and task != Task.CAUSAL_LM:
            raise ValueError("dataset.packing only applies to task causal-lm")
        if self.training.pretrain and self.method.type != MethodType.FULL:
            raise ValueError("training.pretrain trains every weight from a random init; "
                             "it needs method.type full")
        # AWS_ENDPOINT_URL is reserved outright (PodSpec); the region only when set here.
        if self.storage.region and "AWS_DEFAULT_REGION" in self.pod.env:
            raise ValueError("pod.env.AWS_DEFAULT_REGION conflicts with spec.storage, which "
                             "sets it")
        self._check_options(Task(task))
        return self

    def _check_options(self, task: Task) -> None:
        best = self.training.best_metric
        if best in ("accuracy", "f1") and task != Task.SEQUENCE_CLASSIFICATION:
            raise ValueError(f"training.bestMetric {best} needs task sequence-classification")
        if best == "perplexity" and task == Task.SEQUENCE_CLASSIFICATION:
            raise ValueError("training.bestMetric perplexity needs a language-modelling task")
        push = self.output.push_to_hub
        if push and push.token_secret is None and self.model.token_secret is None:
            raise ValueError("output.pushToHub needs a token that may write to "
                             f"{push.repo}: set output.pushToHub.tokenSecret or "
                             "model.tokenSecret")
        if push and self.model.cache and self.model.cache.read_only:
            raise ValueError("output.pushToHub needs the Hub online, but model.cache.readOnly "
                             "runs the Hub client offline (HF_HUB_OFFLINE=1); use a writable "
                             "cache or push from another job")
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

    def _check_objective(self) -> None:
        """The data layout fits the objective: pairs for dpo/orpo, never pairs for sft."""
        objective, layout = self.training.objective, self.dataset.fields.layout
        if objective == Objective.SFT:
            if layout in PREFERENCE_LAYOUTS:
                raise ValueError("dataset.fields chosen/rejected need training.objective dpo or "
                                 "orpo")
            return
        if self.model.task != Task.CAUSAL_LM:
            raise ValueError(f"training.objective {objective} needs model.task causal-lm "
                             f"(got {self.model.task})")
        if layout not in PREFERENCE_LAYOUTS:
            raise ValueError(f"training.objective {objective} needs dataset.fields "
                             f"prompt+chosen+rejected or chosen+rejected (got {layout})")
        if self.dataset.packing:
            raise ValueError(f"dataset.packing does not apply to training.objective "
                             f"{objective} (pairs are compared whole)")
        if self.training.best_metric == "perplexity":
            raise ValueError(f"training.bestMetric perplexity does not apply to "
                             f"training.objective {objective} (its eval loss is a preference "
                             f"loss); use loss")

    @model_validator(mode="after")
    def _check_what_the_api_server_would_reject(self) -> FineTuneJobSpec:
        """Caught here, before any child exists: the API server would refuse the Job later."""
        for field_name in ("cpu", "memory", "shm_size"):
            value = getattr(self.pod, field_name)
            if value is not None and not QUANTITY.fullmatch(value):
                raise ValueError(f"pod.{to_camel(field_name)} {value!r} is not a Kubernetes "
                                 "quantity (e.g. 8, 500m, 64Gi, 1.5G)")
        for name in self.pod.env:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"pod.env name {name!r} is not a valid environment variable "
                                 "name (letters, digits, '_', '-', '.'; not starting with a "
                                 "digit)")
        ranks = max(1, self.resources.gpus_per_node)
        first, last = self.metrics.port, self.metrics.port + ranks - 1
        if first <= DEFAULT_MASTER_PORT <= last:
            raise ValueError(f"metrics.port {first} (ports {first}-{last}, one per rank of a "
                             f"node) would clash with torchrun's port {DEFAULT_MASTER_PORT}")
        if last > 65535:
            raise ValueError(f"metrics.port {first} + {ranks} ranks per node goes past 65535")
        return self


# Kubernetes resource quantities (apimachinery resource.Quantity, non-negative).
QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?")
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


TASK_LAYOUTS: dict[Task, tuple[str, ...]] = {
    Task.CAUSAL_LM: ("text", "prompt-completion", "messages", *PREFERENCE_LAYOUTS),
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
