"""Every user-settable training parameter reaches the library that acts on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetune_api.load import SpecError
from kubetune_api.spec import MethodSpec
from kubetune_trainer.factories import peft_config, quantization_config
from kubetune_trainer.modeling import Precision, compute_dtype, resolve_precision
from kubetune_trainer.recipe import training_arguments
from support.jobs import example_job


def test_training_section_maps_to_trainer_arguments(tmp_path: Path) -> None:
    job = example_job("tiny-lora", tmp_path, training={
        "epochs": 2.5, "maxSteps": 17, "perDeviceBatchSize": 3, "gradientAccumulationSteps": 5,
        "learningRate": 1.5e-4, "lrScheduler": "linear", "warmupRatio": 0.1,
        "weightDecay": 0.01, "maxGradNorm": 0.5, "seed": 7, "logEverySteps": 3,
        "evalEverySteps": 4})
    args = training_arguments(job, Precision("fp32"), tmp_path, has_eval=True, cuda=False)
    assert (args.num_train_epochs, args.max_steps) == (2.5, 17)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (3, 3)
    assert args.gradient_accumulation_steps == 5
    assert args.learning_rate == 1.5e-4 and args.lr_scheduler_type == "linear"
    assert args.get_warmup_steps(100) == 10
    assert (args.weight_decay, args.max_grad_norm) == (0.01, 0.5)
    assert (args.seed, args.data_seed) == (7, 7)
    assert args.logging_steps == 3
    assert (args.eval_strategy, args.eval_steps) == ("steps", 4)
    assert args.train_sampling_strategy == "group_by_length"
    assert not args.bf16 and not args.fp16 and args.use_cpu


def test_defaults_and_packing_and_no_eval(tmp_path: Path) -> None:
    job = example_job("tiny-pretrain", tmp_path, training={"evalEverySteps": 4})
    args = training_arguments(job, Precision("bf16"), tmp_path, has_eval=False, cuda=False)
    assert args.max_steps == -1  # epochs decide
    assert args.eval_strategy == "no"  # nothing to evaluate on
    assert args.train_sampling_strategy == "random"  # packed blocks are all full
    assert args.bf16 and not args.fp16


def test_precision_auto_is_fp32_on_cpu_and_explicit_choices_win() -> None:
    assert resolve_precision("auto", cuda=False) == Precision("fp32")
    assert resolve_precision("bf16", cuda=False).dtype == torch.bfloat16
    assert resolve_precision("fp32", cuda=True) == Precision("fp32")
    with pytest.raises(SpecError, match=r"spec\.training\.precision: fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cuda=False)


@pytest.mark.parametrize(("native", "emulated", "expected"), [
    (True, True, "bf16"),  # A100, H100, L4...
    (False, True, "fp16"),  # T4, V100: bf16 only emulated, much slower than fp16
    (False, False, "fp16"),
])
def test_precision_auto_does_not_count_emulated_bf16(monkeypatch: pytest.MonkeyPatch,
                                                     native: bool, emulated: bool,
                                                     expected: str) -> None:
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or (including_emulation and emulated)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto", cuda=True) == Precision(expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_precision_auto_on_gpu() -> None:
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    assert resolve_precision("auto", cuda=True) == Precision(expected)


def test_lora_factory() -> None:
    method = MethodSpec.model_validate({"type": "lora", "lora": {
        "r": 4, "alpha": 12, "dropout": 0.2, "targetModules": ["q_proj", "v_proj"]}})
    config = peft_config(method, "causal-lm")
    assert config is not None
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 12, 0.2)
    assert set(config.target_modules or ()) == {"q_proj", "v_proj"}
    assert config.task_type == "CAUSAL_LM"
    assert peft_config(method, "sequence-classification").task_type == "SEQ_CLS"  # type: ignore[union-attr]
    assert peft_config(MethodSpec.model_validate({"type": "full"}), "causal-lm") is None
    default = peft_config(MethodSpec.model_validate({"type": "lora"}), "causal-lm")
    assert default is not None and default.target_modules == "all-linear"
    assert quantization_config(method, torch.float32) is None


def test_quantization_factory() -> None:
    method = MethodSpec.model_validate({"type": "qlora", "quantization": {
        "bits": 4, "quantType": "fp4", "doubleQuant": False, "computeDtype": "float16"}})
    config = quantization_config(method, torch.float16)
    assert config is not None and config.load_in_4bit
    assert config.bnb_4bit_quant_type == "fp4" and not config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float16
    assert config.bnb_4bit_quant_storage == torch.uint8
    stored = quantization_config(method, torch.bfloat16, quant_storage=torch.bfloat16)
    assert stored is not None and stored.bnb_4bit_quant_storage == torch.bfloat16
    eight = MethodSpec.model_validate({"type": "qlora", "quantization": {"bits": 8}})
    config8 = quantization_config(eight, torch.float32)
    assert config8 is not None and config8.load_in_8bit and not config8.load_in_4bit


def test_compute_dtype_follows_precision_unless_set(tmp_path: Path) -> None:
    job = example_job("tiny-qlora", tmp_path)
    assert compute_dtype(job.spec, Precision("bf16")) == torch.bfloat16  # auto
    job.spec.method.quantization.compute_dtype = "float32"  # type: ignore[union-attr]
    assert compute_dtype(job.spec, Precision("bf16")) == torch.float32
