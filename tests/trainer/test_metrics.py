"""kubetune_trainer.metrics: served over real HTTP, parsed with prometheus_client's parser."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from unittest import mock

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_api import contract
from kubetune_trainer.metrics import PHASES, TrainerMetrics, metrics_callback


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics(clock: FakeClock) -> Iterator[TrainerMetrics]:
    m = TrainerMetrics(3, model="tiny-llama", method="lora", task="causal-lm", window=4,
                       clock=clock)
    yield m
    m.stop()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of one scrape over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset({"rank": "3", **labels}.items()))]


def test_serves_every_series_with_rank_label(metrics: TrainerMetrics, clock: FakeClock) -> None:
    port = metrics.serve(0)
    assert port > 0 and metrics.serve(0) == port  # idempotent
    metrics.set_total_steps(100)
    metrics.set_phase("training")
    for step in range(1, 4):
        clock.now += 2.0
        metrics.on_step(step, step / 50, tokens=512, samples=8)
    metrics.on_log(loss=2.5, learning_rate=1e-4, grad_norm=0.75)
    metrics.on_log(eval_loss=2.25)

    samples = scrape(port)

    assert {dict(labels).get("rank") for _, labels in samples} == {"3"}
    assert value(samples, contract.METRIC_STEP) == 3
    assert value(samples, contract.METRIC_TOTAL_STEPS) == 100
    assert value(samples, contract.METRIC_LOSS) == 2.5
    assert value(samples, "kubetune_trainer_eval_loss") == 2.25
    assert value(samples, "kubetune_trainer_learning_rate") == pytest.approx(1e-4)
    assert value(samples, "kubetune_trainer_grad_norm") == 0.75
    assert value(samples, "kubetune_trainer_epoch") == pytest.approx(0.06)
    assert value(samples, "kubetune_trainer_tokens_total") == 3 * 512
    assert value(samples, contract.METRIC_TOKENS_PER_SECOND) == pytest.approx(256.0)
    assert value(samples, "kubetune_trainer_samples_per_second") == pytest.approx(4.0)
    assert value(samples, contract.METRIC_ETA_SECONDS) == pytest.approx(97 * 2.0)
    assert value(samples, "kubetune_trainer_info", model="tiny-llama", method="lora",
                 task="causal-lm") == 1
    assert value(samples, "kubetune_trainer_upload_bytes_total") == 0
    names = {name for name, _ in samples}
    for expected in ("kubetune_trainer_checkpoint_last_step",
                     "kubetune_trainer_checkpoint_save_duration_seconds_count",
                     "kubetune_trainer_checkpoint_upload_duration_seconds_bucket"):
        assert expected in names
    # No CUDA here: the GPU series are declared but have no samples.
    assert not any(n.startswith("kubetune_trainer_gpu_memory") for n in names)


def test_step_moves_and_rates_follow_recent_steps(metrics: TrainerMetrics, clock: FakeClock):
    port = metrics.serve(0)
    metrics.set_total_steps(10)
    metrics.on_step(1, 0.1, tokens=100, samples=1)  # no phase anchor: no rate from one point
    assert value(scrape(port), contract.METRIC_TOKENS_PER_SECOND) == 0
    for step in range(2, 8):  # slow steps, then fast ones: the window (4) forgets the slow
        clock.now += 10.0 if step < 4 else 1.0
        metrics.on_step(step, step / 10, tokens=100, samples=1)

    samples = scrape(port)

    assert value(samples, contract.METRIC_STEP) == 7
    assert value(samples, contract.METRIC_TOKENS_PER_SECOND) == pytest.approx(100.0)
    assert value(samples, contract.METRIC_ETA_SECONDS) == pytest.approx(3.0)
    metrics.set_phase("done")
    assert value(scrape(port), contract.METRIC_ETA_SECONDS) == 0


def test_checkpoint_histograms_and_upload_bytes(metrics: TrainerMetrics) -> None:
    port = metrics.serve(0)
    metrics.observe_checkpoint(20, save_seconds=0.7, upload_seconds=12.0, uploaded_bytes=4096)
    metrics.observe_checkpoint(40, save_seconds=3.0, upload_seconds=40.0, uploaded_bytes=4096)
    metrics.add_uploaded_bytes(1000)

    samples = scrape(port)

    assert value(samples, "kubetune_trainer_checkpoint_last_step") == 40
    assert value(samples, "kubetune_trainer_upload_bytes_total") == 9192
    save = "kubetune_trainer_checkpoint_save_duration_seconds"
    upload = "kubetune_trainer_checkpoint_upload_duration_seconds"
    assert value(samples, f"{save}_count") == 2
    assert value(samples, f"{save}_sum") == pytest.approx(3.7)
    assert value(samples, f"{save}_bucket", le="0.5") == 0
    assert value(samples, f"{save}_bucket", le="1.0") == 1
    assert value(samples, f"{save}_bucket", le="5.0") == 2
    assert value(samples, f"{upload}_bucket", le="30.0") == 1
    assert value(samples, f"{upload}_bucket", le="+Inf") == 2


def test_phase_gauge_is_exclusive(metrics: TrainerMetrics) -> None:
    port = metrics.serve(0)

    def current() -> list[str]:
        samples = scrape(port)
        return [p for p in PHASES if value(samples, "kubetune_trainer_phase", phase=p) == 1]

    assert current() == ["starting"]
    for phase in ("loading", "training", "checkpointing", "training", "failed"):
        metrics.set_phase(phase)
        assert current() == [phase]
    with pytest.raises(ValueError, match="unknown phase"):
        metrics.set_phase("sleeping")


def test_instances_do_not_collide_and_stop_frees_the_port() -> None:
    a = TrainerMetrics(0, model="m", method="full", task="causal-lm")
    b = TrainerMetrics(1, model="m", method="full", task="causal-lm")
    port = a.serve(0)
    try:
        assert b.registry is not a.registry
        assert {dict(labels).get("rank") for _, labels in scrape(port)} == {"0"}
    finally:
        a.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_gpu_memory_calls_the_real_torch_cuda_api(metrics: TrainerMetrics,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: torch.cuda autospecced from the installed torch answers as a GPU would.
    A misspelt or re-signed call fails the spec (the metrics swallow errors, so no sample
    would appear). The values themselves: test_gpu_memory_on_a_real_gpu."""
    import torch

    cuda = mock.create_autospec(torch.cuda, spec_set=True)
    cuda.is_available.return_value = True
    cuda.current_device.return_value = 1
    cuda.memory_allocated.side_effect = lambda device=None: 1000 * (device + 1)
    cuda.memory_reserved.side_effect = lambda device=None: 5000 * (device + 1)
    monkeypatch.setattr(torch, "cuda", cuda)
    port = metrics.serve(0)
    metrics.on_step(1, 0.0, tokens=0, samples=0)
    samples = scrape(port)
    assert value(samples, "kubetune_trainer_gpu_memory_allocated_bytes") == 2000
    assert value(samples, "kubetune_trainer_gpu_memory_reserved_bytes") == 10000
    cuda.memory_allocated.assert_called_with(1)
    # A broken call (here: a CUDA runtime error) leaves the series without a sample.
    cuda.memory_reserved.side_effect = RuntimeError("CUDA error: device-side assert")
    metrics.on_step(2, 0.0, tokens=0, samples=0)
    assert value(scrape(port), "kubetune_trainer_gpu_memory_reserved_bytes") == 10000


@pytest.mark.gpu
def test_gpu_memory_on_a_real_gpu(metrics: TrainerMetrics) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    port = metrics.serve(0)
    metrics.on_step(1, 0.0, tokens=0, samples=0)
    samples = scrape(port)
    allocated = value(samples, "kubetune_trainer_gpu_memory_allocated_bytes")
    assert allocated == torch.cuda.memory_allocated() >= block.numel()
    assert value(samples, "kubetune_trainer_gpu_memory_reserved_bytes") >= allocated
    del block


def test_trainer_metrics_needs_neither_torch_nor_transformers() -> None:
    code = (
        "import sys\n"
        "from kubetune_trainer.metrics import TrainerMetrics\n"
        "m = TrainerMetrics(0, model='m', method='lora', task='t')\n"
        "m.set_phase('training'); m.on_step(1, 0.1, tokens=1, samples=1)\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_metrics_callback_drives_metrics(metrics: TrainerMetrics, clock: FakeClock) -> None:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

    from kubetune_trainer.metrics import MetricsCallback

    port = metrics.serve(0)
    counted = iter([300, 200, 100])
    fractions = iter([None, 0.5, 0.875])  # None: nothing fed yet, so no sample is set
    callback = metrics_callback(metrics, count_tokens=lambda: next(counted),
                                nonpad_fraction=lambda: next(fractions))
    assert isinstance(callback, MetricsCallback) and isinstance(callback, TrainerCallback)
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, use_cpu=True, report_to=[])
    state, control = TrainerState(max_steps=30), TrainerControl()

    callback.on_train_begin(args, state, control)
    assert metrics.phase == "training"
    for step in (1, 2, 3):
        clock.now += 0.5
        state.global_step, state.epoch = step, step / 10
        callback.on_step_end(args, state, control)
    callback.on_log(args, state, control, logs={"loss": 1.5, "learning_rate": 2e-5,
                                                 "grad_norm": 0.3, "epoch": 0.3})
    callback.on_prediction_step(args, state, control)
    assert metrics.phase == "evaluating"
    callback.on_evaluate(args, state, control, metrics={"eval_loss": 1.25})
    assert metrics.phase == "training"
    callback.on_train_end(args, state, control)
    callback.on_evaluate(args, state, control, metrics={"eval_loss": 1.0})
    assert metrics.phase == "training"  # after training, the trainer sets phases itself

    samples = scrape(port)

    assert value(samples, contract.METRIC_TOTAL_STEPS) == 30
    assert value(samples, contract.METRIC_STEP) == 3
    assert value(samples, "kubetune_trainer_tokens_total") == 600
    assert value(samples, "kubetune_trainer_nonpad_fraction") == 0.875
    assert value(samples, contract.METRIC_TOKENS_PER_SECOND) == pytest.approx(600 / 1.5)
    assert value(samples, "kubetune_trainer_samples_per_second") == pytest.approx(8 * 3 / 1.5)
    assert value(samples, contract.METRIC_ETA_SECONDS) == pytest.approx(27 * 0.5)
    assert value(samples, contract.METRIC_LOSS) == 1.5
    assert value(samples, "kubetune_trainer_learning_rate") == pytest.approx(2e-5)
    assert value(samples, "kubetune_trainer_grad_norm") == pytest.approx(0.3)
    assert value(samples, "kubetune_trainer_eval_loss") == 1.0
