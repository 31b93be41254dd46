"""tests/support/images.py's pure parts: the host's pip configuration as build volumes, the
leak check on a built image's files, the GPU images' check up to their base."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import images


def test_pip_config_becomes_a_build_only_file_and_read_only_mounts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "WORK", tmp_path / "work")
    index = tmp_path / "mirror" / "simple"
    index.mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cert = tmp_path / "certs" / "ca.crt"
    cert.parent.mkdir()
    cert.write_text("CA")
    conf, volumes = images.pip_build_volumes({
        "cert": str(cert), "find-links": str(wheels), "timeout": "180",
        "extra-index-url": f"https://pypi.example/simple file://{index}"})
    inside = images.HOST_MOUNTS
    assert Path(conf).read_text().splitlines() == [
        "[global]", f"cert = {inside}{cert}", "extra-index-url = https://pypi.example/simple "
        f"file://{inside}{index}", f"find-links = {inside}{wheels}", "timeout = 180"]
    assert volumes == [f"{conf}:/etc/pip.conf:ro",
                       f"{cert.parent}:{inside}{cert.parent}:ro",
                       # an index's pages link to files beside it: its parent is mounted
                       f"{index.parent}:{inside}{index.parent}:ro",
                       f"{wheels}:{inside}{wheels}:ro"]


def test_empty_mount_points_pass_the_leak_check_and_any_byte_fails_it(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "pip.conf").write_text("")
    (tmp_path / "run" / "kubetune-host" / "opt" / "wheels").mkdir(parents=True)
    assert not images.holds_content(str(tmp_path / "etc" / "pip.conf"))
    assert not images.holds_content(str(tmp_path / "run"))
    (tmp_path / "run" / "kubetune-host" / "opt" / "wheels" / "x.whl").write_text("w")
    assert images.holds_content(str(tmp_path / "run"))


def test_gpu_images_are_checked_up_to_their_base() -> None:
    gpu = [image for image in images.IMAGES if image.gpu]
    assert [images.gpu_base_check(image) for image in gpu] == [
        "pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime",
        "pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime"]


def test_a_torch_pin_the_gpu_base_does_not_carry_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "constraints.txt").write_text("torch==9.9.9\n")
    (tmp_path / "trainer_image").mkdir()
    dockerfile = (images.ROOT / "trainer_image" / "Dockerfile").read_text()
    (tmp_path / "trainer_image" / "Dockerfile").write_text(dockerfile)
    monkeypatch.setattr(images, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=r"TORCH_VERSION 2\.13\.0 is not constraints\.txt's"):
        images.gpu_base_check(images.IMAGES[2])
