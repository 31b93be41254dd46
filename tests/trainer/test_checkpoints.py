"""Checkpoint selection and pruning, strategy configs, node exit codes (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune_api import contract
from kubetune_api.load import SpecError
from kubetune_trainer import checkpoints, strategies
from kubetune_trainer.modeling import Precision
from kubetune_trainer.node import exit_code_of
from support.jobs import example_job

ME, OTHER = "a1b2c3", "d4e5f6"


def make_checkpoint(root: Path, step: int, complete: bool, identity: str | None = ME) -> None:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(b"x")
    owner = json.dumps({"identity": identity} if identity else {})
    (folder / checkpoints.OWNER_FILE).write_text(owner)
    if complete:
        (folder / contract.CHECKPOINT_MARKER_FILE).write_text(owner)


def test_partial_checkpoints_are_never_resumed_from(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 5, complete=True)
    make_checkpoint(tmp_path, 10, complete=True)
    make_checkpoint(tmp_path, 15, complete=False)  # the upload died before the marker
    (tmp_path / "not-a-checkpoint").mkdir()
    assert checkpoints.complete_steps(str(tmp_path)) == [5, 10]
    assert checkpoints.resume_step(str(tmp_path), ME) == 10
    assert checkpoints.resume_step(str(tmp_path / "missing"), ME) is None


def test_prune_keeps_the_newest_complete_ones(tmp_path: Path) -> None:
    for step, complete in [(5, True), (7, False), (10, True), (15, True), (20, False)]:
        make_checkpoint(tmp_path, step, complete)
    checkpoints.prune(str(tmp_path), keep_last=2, identity=ME)
    left = sorted(p.name for p in tmp_path.iterdir())
    # old complete and old partial gone; a partial newer than every complete one is untouched
    assert left == ["checkpoint-10", "checkpoint-15", "checkpoint-20"]


def test_another_jobs_checkpoints_are_never_resumed_or_pruned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_checkpoint(tmp_path, 5, complete=True)
    make_checkpoint(tmp_path, 8, complete=False, identity=OTHER)  # its upload in flight
    make_checkpoint(tmp_path, 10, complete=True, identity=OTHER)
    make_checkpoint(tmp_path, 12, complete=True, identity=None)  # before identities existed
    make_checkpoint(tmp_path, 15, complete=True)
    make_checkpoint(tmp_path, 20, complete=True, identity=OTHER)
    with caplog.at_level("WARNING", logger="kubetune"):
        assert checkpoints.resume_step(str(tmp_path), ME) == 15
    assert "checkpoint-20: it belongs to another job (identity d4e5f6, this job a1b2c3)" \
        in caplog.text
    assert "checkpoint-12: it belongs to another job (identity unrecorded" in caplog.text
    assert checkpoints.resume_step(str(tmp_path), OTHER) == 20
    checkpoints.prune(str(tmp_path), keep_last=1, identity=ME)
    left = sorted(int(p.name.removeprefix("checkpoint-")) for p in tmp_path.iterdir())
    assert left == [8, 10, 12, 15, 20]  # only my older checkpoint 5 went
    assert checkpoints.foreign_owner(str(tmp_path), 20, ME) == OTHER
    assert checkpoints.foreign_owner(str(tmp_path), 15, ME) is None


def test_identity_follows_the_job_uid_and_the_weight_shaping_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = example_job("tiny-lora", tmp_path)
    monkeypatch.delenv(contract.JOB_UID_ENV, raising=False)
    local = checkpoints.job_identity(job, "digest")
    assert local == checkpoints.job_identity(example_job("tiny-lora", tmp_path / "x"), "digest")
    assert local != checkpoints.job_identity(job, "other-data")
    edited = example_job("tiny-lora", tmp_path, training={"learningRate": 1e-3})
    assert local != checkpoints.job_identity(edited, "digest")
    logged = example_job("tiny-lora", tmp_path, training={"logEverySteps": 7, "maxSteps": 99},
                         checkpoint={"keepLast": 5})  # a longer run of the same job resumes
    assert local == checkpoints.job_identity(logged, "digest")
    monkeypatch.setenv(contract.JOB_UID_ENV, "uid-1")
    first = checkpoints.job_identity(job, "digest")
    monkeypatch.setenv(contract.JOB_UID_ENV, "uid-2")  # deleted and re-created: a new job
    assert len({local, first, checkpoints.job_identity(job, "digest")}) == 3


def test_checkpoint_root_defaults_under_the_output(tmp_path: Path) -> None:
    job = example_job("tiny-lora", "s3://bucket/run/")
    assert checkpoints.root_uri(job.spec, "s3://bucket/run/") == "s3://bucket/run/checkpoints"
    job.spec.checkpoint.uri = "s3://other/ckpt"
    assert checkpoints.root_uri(job.spec, "s3://bucket/run/") == "s3://other/ckpt"


def test_deepspeed_configs_are_generated_and_overridable(tmp_path: Path) -> None:
    job = example_job("tiny-lora", tmp_path, training={
        "strategy": "deepspeed-zero3",
        "strategyConfig": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}})
    config = strategies.strategy_arguments(job.spec, Precision("bf16"), cuda=False)["deepspeed"]
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["overlap_comm"]
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    job.spec.training.strategy = "deepspeed-zero2"  # type: ignore[assignment]
    job.spec.training.strategy_config = {}
    zero2 = strategies.deepspeed_config(job.spec, Precision("fp16"))
    assert zero2["zero_optimization"]["stage"] == 2 and zero2["fp16"]["enabled"]
    assert "stage3_gather_16bit_weights_on_model_save" not in zero2["zero_optimization"]


def test_fsdp_and_ddp_arguments(tmp_path: Path) -> None:
    job = example_job("tiny-lora", tmp_path, training={
        "strategy": "fsdp", "gradientCheckpointing": True,
        "strategyConfig": {"limit_all_gathers": True}})
    with pytest.raises(SpecError, match="fsdp needs CUDA GPUs"):
        strategies.strategy_arguments(job.spec, Precision("fp32"), cuda=False)
    args = strategies.strategy_arguments(job.spec, Precision("bf16"), cuda=True)
    assert args["fsdp"] is True and args["fsdp_config"]["limit_all_gathers"]
    # Checkpointing is transformers' (make_trainable), never accelerate's FSDP wrapper.
    assert args["fsdp_config"]["activation_checkpointing"] is False
    job.spec.training.strategy = "ddp"  # type: ignore[assignment]
    assert strategies.strategy_arguments(job.spec, Precision("bf16"), cuda=False) == {}


def test_fsdp2_settings_are_explicit_and_only_node_leaders_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the Trainer's TrainingArguments make of the FSDP arguments (FSDP2, a full state dict
    at save, rank-0 loading), and what from_pretrained reads to load on node leaders only."""
    from transformers import TrainingArguments
    from transformers.distributed import fsdp as hf_fsdp

    for name in strategies.FSDP_LOADING_ENV:  # set, then removed: undone after the test,
        monkeypatch.setenv(name, "")  # so prepare_loading's variables do not outlive it (they
        monkeypatch.delenv(name)  # turned a later test's plain Trainer into an FSDP one)
    job = example_job("tiny-lora", tmp_path, training={"strategy": "fsdp"})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                             **strategies.fsdp_arguments(job.spec))
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"
    assert args.fsdp_plugin_args["cpu_ram_efficient_loading"] is True
    monkeypatch.setattr(hf_fsdp, "_is_torch_distributed_initialized", lambda: True)
    assert not hf_fsdp.is_fsdp_enabled()  # the arguments alone: every rank would load it all
    strategies.prepare_loading(job.spec)
    assert hf_fsdp.is_fsdp_enabled()
    with strategies.unsharded_loading():  # the reloads after training: rank 0 alone, whole
        assert not hf_fsdp.is_fsdp_enabled()
    assert hf_fsdp.is_fsdp_enabled()


def test_reloads_after_training_leave_zero3_sharded_loading_aside(tmp_path: Path) -> None:
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    job = example_job("tiny-lora", tmp_path, training={"strategy": "deepspeed-zero3"})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                             **strategies.strategy_arguments(job.spec, Precision("fp32"), False))
    try:
        assert is_deepspeed_zero3_enabled()  # what from_pretrained reads: load sharded
        with strategies.unsharded_loading():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()  # back for the rest of the run
    finally:
        unset_hf_deepspeed_config()  # the global outlives this test otherwise
    assert args.deepspeed


@pytest.mark.parametrize(("strategy", "storage", "device_map"), [
    ("ddp", None, {"": 3}),  # accelerate#1515: each rank its own device
    ("deepspeed-zero2", None, {"": 3}),
    ("deepspeed-zero3", torch.bfloat16, None),  # peft#2016: flatten with the other params
    ("fsdp", torch.bfloat16, None),
])
def test_qlora_placement_traps(tmp_path: Path, strategy: str, storage: torch.dtype | None,
                               device_map: dict | None) -> None:
    job = example_job("tiny-qlora", tmp_path, training={"strategy": strategy})
    # The storage follows the training precision, not the compute dtype: ZeRO-3 and FSDP2
    # cast every parameter to the mixed-precision dtype, packed 4-bit bytes included.
    job.spec.method.quantization.compute_dtype = "float16"  # type: ignore[union-attr]
    assert strategies.quant_storage(job.spec, Precision("bf16")) == storage
    assert strategies.device_map(job.spec, 3) == device_map
    lora = example_job("tiny-lora", tmp_path, training={"strategy": strategy})
    assert strategies.quant_storage(lora.spec, Precision("bf16")) is None
    # Every method loads straight onto the rank's GPU unless the strategy shards; on CPU in place.
    assert strategies.device_map(lora.spec, 3) == device_map
    assert strategies.device_map(lora.spec, "cpu") is None


def test_deepspeed_offload_steps_an_optimizer_the_image_can_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def config(strategy_config: dict) -> dict:
        job = example_job("tiny-lora", tmp_path, training={
            "strategy": "deepspeed-zero2", "strategyConfig": strategy_config})
        return strategies.deepspeed_config(job.spec, Precision("bf16"))

    offload = {"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": True}}}
    own = {**offload, "optimizer": {"type": "Adam", "params": {"lr": 1e-4}}}
    # DeepSpeed's CPU Adam prebuilt (DS_BUILD_CPU_ADAM=1): it is chosen for offload.
    monkeypatch.setattr(strategies, "cpu_adam_prebuilt", lambda: True)
    assert config(offload)["optimizer"] == {"type": "AdamW", "params": {
        "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    assert "zero_force_ds_cpu_optimizer" not in config(offload)
    assert config(own)["optimizer"] == own["optimizer"]  # the user's own block wins
    # Not prebuilt (the pinned deepspeed from PyPI): the Trainer's torch optimizer, allowed.
    monkeypatch.setattr(strategies, "cpu_adam_prebuilt", lambda: False)
    assert "optimizer" not in config(offload)
    assert config(offload)["zero_force_ds_cpu_optimizer"] is False
    assert "optimizer" not in config({})  # no offload: the Trainer's torch optimizer
    assert "zero_force_ds_cpu_optimizer" not in config({})
    assert "optimizer" not in config({"zero_optimization": {"offload_optimizer": {
        "device": "none"}}})
    # A DeepSpeed optimizer named by the user needs a compiler when not prebuilt.
    monkeypatch.setenv("CXX", "g++")
    monkeypatch.setattr(strategies.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert config(own)["optimizer"] == own["optimizer"]
    monkeypatch.setattr(strategies.shutil, "which", lambda name: None)
    with pytest.raises(SpecError, match=r"strategyConfig.optimizer: .*neither prebuilt nor a "
                                        r"compiler \(g\+\+\)"):
        config(own)
    assert config(offload)["zero_force_ds_cpu_optimizer"] is False  # still runs


@pytest.mark.parametrize(("codes", "expected"), [
    ([2], contract.EXIT_INVALID_SPEC),
    ([1, 75], contract.EXIT_PREEMPTED),
    ([-9, 2], contract.EXIT_INVALID_SPEC),
    ([-9], 1),
    ([137], 137),
])
def test_node_exit_codes(codes: list[int], expected: int) -> None:
    assert exit_code_of(codes) == expected


def test_sigterm_after_publishing_is_not_a_preemption(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune_trainer.node import already_published

    log = tmp_path / "termination-log"
    monkeypatch.setenv(contract.TERMINATION_LOG_ENV, str(log))
    assert not already_published()  # nothing written yet
    log.write_text("Traceback (most recent call last): ...")
    assert not already_published()  # a crash message is not a success
    log.write_text('{"uri": "s3://b/out", "manifestSha256": "ab12"}')
    assert already_published()


@pytest.mark.parametrize(("strategy", "precision", "refused"), [
    ("deepspeed-zero3", "fp32", True),  # fp32 storage under ZeRO-3 breaks the 4-bit unpacking
    ("fsdp", "fp32", True),
    ("deepspeed-zero3", "bf16", False),
    ("ddp", "fp32", False),  # uint8 storage, nothing flattens it
])
def test_sharded_qlora_needs_a_half_precision(tmp_path: Path, strategy: str, precision: str,
                                              refused: bool) -> None:
    job = example_job("tiny-qlora", tmp_path, training={"strategy": strategy})
    if refused:
        with pytest.raises(SpecError, match=f"spec.training.precision: qlora under {strategy}"):
            strategies.check_precision(job.spec, Precision(precision))
    else:
        strategies.check_precision(job.spec, Precision(precision))


def test_parameter_counts_read_zero3_placeholders_whole() -> None:
    """Under ZeRO-3 every rank's parameter is an empty placeholder; ds_numel is its size."""
    from kubetune_trainer.modeling import parameter_counts

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    for param, whole in zip(model.parameters(), (32, 8, 16, 2), strict=True):
        param.data = torch.empty(0)
        param.ds_numel = whole  # type: ignore[attr-defined]
    assert parameter_counts(model) == (18, 58)


def test_collective_timeout_keeps_resuming_and_reaches_the_arguments(tmp_path: Path) -> None:
    """Raising training.collectiveTimeoutSeconds after a run timed out at a checkpoint must
    resume that run, and the value is what transformers hands accelerate/DeepSpeed on GPUs
    (ddp_timeout; the CPU process group: test_distributed)."""
    from kubetune_trainer.recipe import training_arguments

    job = example_job("tiny-lora", tmp_path)
    raised = example_job("tiny-lora", tmp_path, training={"collectiveTimeoutSeconds": 7200})
    assert checkpoints.job_identity(job, "d") == checkpoints.job_identity(raised, "d")
    assert job.spec.training.collective_timeout_seconds == 3600
    args = training_arguments(raised, Precision("fp32"), tmp_path, has_eval=False, cuda=True)
    assert args.ddp_timeout == 7200
    with pytest.raises(SpecError, match="collectiveTimeoutSeconds"):
        example_job("tiny-lora", tmp_path, training={"collectiveTimeoutSeconds": 10})


# A ZeRO-3 checkpoint of 4 ranks on 2 nodes, as DeepSpeed and the HF Trainer name its files.
ZERO3_CHECKPOINT = [
    "adapter_model.safetensors", "trainer_state.json", "scheduler.pt", "latest",
    "zero_to_fp32.py", "global_step6/mp_rank_00_model_states.pt",
    *(f"rng_state_{r}.pth" for r in range(4)),
    *(f"global_step6/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)),
    *(f"global_step6/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(4)),
]
SHARED = ZERO3_CHECKPOINT[:6]


def test_each_node_fetches_only_its_ranks_partitions() -> None:
    second = checkpoints.files_for_ranks(ZERO3_CHECKPOINT, range(2, 4), world=4)
    assert set(second) == {*SHARED, "rng_state_2.pth", "rng_state_3.pth",
                           *(f"global_step6/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                             for r in (2, 3)),
                           *(f"global_step6/zero_pp_rank_{r}_mp_rank_00_model_states.pt"
                             for r in (2, 3))}
    first = checkpoints.files_for_ranks(ZERO3_CHECKPOINT, range(0, 2), world=4)
    assert set(first) | set(second) == set(ZERO3_CHECKPOINT)
    assert set(first) & set(second) == set(SHARED)
    # Written by another world size: its partitions do not map to ranks, fetch them all.
    assert checkpoints.files_for_ranks(ZERO3_CHECKPOINT, range(0, 1), world=2) == \
        ZERO3_CHECKPOINT
    plain = ["model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"]
    assert checkpoints.files_for_ranks(plain, range(0, 1), world=1) == plain


@pytest.mark.parametrize("strategy_config", [{}, {"zero_optimization": {
    "elastic_checkpoint": True}}])
def test_fetch_downloads_what_the_nodes_ranks_read(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   strategy_config: dict) -> None:
    """Node 1 of 2 (ranks 2 and 3) through checkpoints.fetch and the storage layer; a config
    under which each rank reads every partition (elastic checkpoint) fetches all."""
    root = tmp_path / "remote"
    for name in ZERO3_CHECKPOINT:
        (root / "checkpoint-6" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "checkpoint-6" / name).write_text(name)
    for name, value in {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4",
                        "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    spec = example_job("tiny-lora", tmp_path, training={
        "strategy": "deepspeed-zero3", "strategyConfig": strategy_config}).spec
    every_rank = strategies.reads_every_partition(spec)
    local = checkpoints.fetch(str(root), 6, tmp_path / "local", every_rank)
    fetched = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    fetched.discard(checkpoints.DOWNLOADED)
    first_node = {n for n in ZERO3_CHECKPOINT if any(f"_{r}_" in n or f"_{r}." in n
                                                     for r in (0, 1))}
    assert len(first_node) == 6
    assert fetched == set(ZERO3_CHECKPOINT) - (set() if every_rank else first_node)
    assert every_rank == bool(strategy_config)
