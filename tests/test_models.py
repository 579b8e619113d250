"""Model layout, safe loading, saving with provenance, and batched inference."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mpistyle import engine, models, nets
from mpistyle.engine import Stylizer
from mpistyle.errors import MpistyleError
from mpistyle.models import load_model, model_info, resolve_model, save_model
from mpistyle.nets import TransformerNet

SAMPLE = Path(__file__).resolve().parents[1] / "mpistyle" / "data" / "sample.mp4"


def _net(seed: int = 0) -> TransformerNet:
    torch.manual_seed(seed)
    net = TransformerNet()
    # Random affine IN parameters, so a loader that silently dropped them would change the output.
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".weight" in name and name.split(".")[-2].startswith("in"):
                p.uniform_(0.5, 1.5)
            elif ".bias" in name and name.split(".")[-2].startswith("in"):
                p.uniform_(-0.5, 0.5)
    return net.eval()


def _frames(n: int = 2, h: int = 32, w: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_layout_matches_fast_neural_style():
    sd = TransformerNet().state_dict()
    for key in (
        "conv1.conv2d.weight",
        "in1.weight",
        "in3.bias",
        "res1.conv1.conv2d.weight",
        "res3.in2.bias",
        "res5.conv2.conv2d.bias",
        "deconv1.conv2d.weight",
        "in5.weight",
        "deconv3.conv2d.bias",
    ):
        assert key in sd
    assert sd["conv1.conv2d.weight"].shape == (32, 3, 9, 9)
    assert sd["deconv3.conv2d.weight"].shape == (3, 32, 9, 9)
    assert not any("running" in k for k in sd)
    assert sum(v.numel() for v in sd.values()) == 1_679_235


def test_stale_running_stats_are_dropped_and_output_matches_plain_forward(tmp_path):
    net = _net()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    # Pre-0.4 fast_neural_style files carry running stats on every InstanceNorm, also in the res blocks.
    for name in [k.rsplit(".", 1)[0] for k in list(sd) if k.endswith(".weight") and ".in" in "." + k]:
        if name.split(".")[-1].startswith("in"):
            ch = sd[name + ".weight"].shape[0]
            sd[name + ".running_mean"] = torch.full((ch,), 3.0)
            sd[name + ".running_var"] = torch.full((ch,), 7.0)
    assert "res2.in1.running_mean" in sd and "in4.running_var" in sd
    path = tmp_path / "old_style.pth"
    torch.save(sd, path)

    loaded = load_model(str(path))
    x = torch.from_numpy(_frames()).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_old_keys_load_strictly_into_the_fused_norm_network():
    """A pre-0.4 state dict (running stats on every norm) loads with strict=True, without mpistyle's loader."""
    net = _net()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    assert {"in1.weight", "in1.bias", "res5.in2.weight", "in5.bias"} <= set(sd)
    sd["in1.running_mean"] = torch.zeros(32)
    sd["res3.in2.running_var"] = torch.ones(128)
    fresh = TransformerNet()
    fresh.load_state_dict(sd, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values(), strict=True))
    # and the other way: the state dict is exactly nn.InstanceNorm2d's
    ref = nets.use_torch_instance_norm(TransformerNet())
    ref.load_state_dict(net.state_dict(), strict=True)
    assert list(ref.state_dict()) == list(net.state_dict())


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_instance_norm_matches_torch_in_fp32_with_gradients(channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # an offset bigger than the spread: where E[x^2] - E[x]^2 would lose digits
    x = (torch.randn(2, 16, 23, 31) * 3 + torch.randn(1, 16, 1, 1) * 30).contiguous(memory_format=fmt)
    fused, ref = nets.InstanceNorm(16), torch.nn.InstanceNorm2d(16, affine=True)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.bias.uniform_(-1, 1)
    ref.load_state_dict(fused.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fused(xa), ref(xb)
    assert ya.dtype == torch.float32 and ya.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(fused.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-3)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def test_fused_network_in_bf16_is_within_50_db_of_fp32_eager():
    """The bundled model on a real frame: fused norm, bf16 weights and activations, channels-last."""
    from mpistyle.io.media import iter_frames

    frame = next(iter(iter_frames(str(SAMPLE), size=(160, 96))))
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    fused = load_model(None)
    ref = nets.use_torch_instance_norm(load_model(None))
    with torch.inference_mode():
        want = ref(x).clamp(0, 255).round()
        got32 = fused(x).clamp(0, 255).round()
        net16 = fused.to(memory_format=torch.channels_last).to(torch.bfloat16)
        got16 = net16(x.bfloat16().contiguous(memory_format=torch.channels_last)).float().clamp(0, 255).round()
    assert (got32 - want).abs().max() <= 1
    assert _psnr(got16.numpy(), want.numpy()) >= 50  # 54-60 dB measured on the bundled models


def test_fp16_weights_are_accepted_as_fp32(tmp_path):
    net = _net()
    path = tmp_path / "half.pth"
    torch.save({k: v.half() for k, v in net.state_dict().items()}, path)
    loaded = load_model(str(path))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    w = loaded.state_dict()["conv1.conv2d.weight"]
    assert torch.allclose(w, net.state_dict()["conv1.conv2d.weight"], atol=1e-3)


class _Payload:
    """Unpickling this creates a file: proof that code in a model file ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickled_code_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    sd = dict(TransformerNet().state_dict())
    sd["evil"] = _Payload(str(marker))
    path = tmp_path / "evil.pth"
    torch.save(sd, path)
    assert not marker.exists()
    with pytest.raises(MpistyleError) as err:
        load_model(str(path))
    assert "refusing" in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["wrong-arch", "shape", "truncated", "not-torch", "empty", "not-tensors"])
def test_bad_files_raise_one_line_errors(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    sd = TransformerNet().state_dict()
    if kind == "wrong-arch":
        torch.save(torch.nn.Conv2d(3, 3, 3).state_dict(), path)
        expect = "missing keys"
    elif kind == "shape":
        sd["res1.conv1.conv2d.weight"] = torch.zeros(128, 128, 1, 1)
        torch.save(sd, path)
        expect = "shape mismatch for res1.conv1.conv2d.weight"
    elif kind == "truncated":
        torch.save(sd, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expect = "corrupt"
    elif kind == "not-torch":
        path.write_bytes(b"this is not a model\n" * 20)
        expect = "corrupt or not a torch file"
    elif kind == "empty":
        path.write_bytes(b"")
        expect = "empty"
    else:
        torch.save([1, 2, 3], path)
        expect = "state dict"
    with pytest.raises(MpistyleError) as err:
        load_model(str(path))
    msg = str(err.value)
    assert expect in msg and str(path) in msg and "\n" not in msg


def test_save_model_is_plain_state_dict_with_provenance(tmp_path):
    net = _net()
    path = tmp_path / "m.pth"
    save_model(net, str(path), {"style": "starry-night.jpg", "settings": {"size": 64}}, half=True)
    # What any other fast_neural_style tool does:
    plain = TransformerNet()
    plain.load_state_dict(torch.load(path, weights_only=True))  # strict by default
    assert plain.state_dict()["in1.weight"].dtype == torch.float32
    raw = torch.load(path, weights_only=True)
    assert raw["conv1.conv2d.weight"].dtype == torch.float16
    info = model_info(str(path))
    assert info["style"] == "starry-night.jpg" and info["settings"] == {"size": 64}
    assert info["stored_dtype"] == "float16"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]  # the temporary file was renamed away
    assert zipfile.is_zipfile(path)
    # fp32 save round-trips exactly
    save_model(net, str(path), {}, half=False)
    again = load_model(str(path))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in net.state_dict().items())
    assert model_info(str(tmp_path / "absent.pth")) == {}


def test_resolve_model_names_paths_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path / "weights")
    with pytest.raises(MpistyleError, match="no bundled model"):
        resolve_model(None)
    (tmp_path / "weights").mkdir()
    save_model(_net(), str(tmp_path / "weights" / "great-wave.pth"), {})
    save_model(_net(1), str(tmp_path / "weights" / (models.DEFAULT_MODEL + ".pth")), {})
    assert set(models.bundled_models()) == {"great-wave", models.DEFAULT_MODEL}
    assert resolve_model(None).endswith(models.DEFAULT_MODEL + ".pth")
    assert resolve_model("great-wave").endswith("great-wave.pth")
    own = tmp_path / "own.pth"
    save_model(_net(), str(own), {})
    assert resolve_model(str(own)) == str(own)
    with pytest.raises(MpistyleError, match=r"unknown model 'mosaic' \(bundled: great-wave, "):
        resolve_model("mosaic")
    with pytest.raises(MpistyleError, match="model file not found"):
        resolve_model(str(tmp_path / "nope.pth"))


def test_shipped_models_load():
    shipped = models.bundled_models()
    assert models.DEFAULT_MODEL in shipped
    for name, path in shipped.items():
        net = load_model(name)
        assert isinstance(net, TransformerNet) and not net.training
        info = model_info(path)
        assert info.get("style_name") == name and info.get("steps", 0) > 0


@pytest.mark.parametrize("h,w", [(32, 32), (30, 37), (17, 9)])
def test_stylizer_keeps_size_and_is_deterministic(h, w):
    frames = _frames(2, h, w)
    sty = Stylizer(_net(), torch.device("cpu"), precision="fp32")
    out = sty(frames)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert np.array_equal(out, sty(frames))
    # batching does not change a frame's result
    assert np.array_equal(out[1:], sty(frames[1:]))


def test_stylizer_matches_plain_forward_and_bf16_is_close():
    net = _net()
    frames = _frames(1, 32, 32)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        ref = net(x).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out32 = Stylizer(net, torch.device("cpu"), precision="fp32", channels_last=False)(frames)
    assert np.abs(out32.astype(int) - ref.astype(int)).max() <= 1
    out16 = Stylizer(net, torch.device("cpu"), precision="bf16")(frames)
    diff = np.abs(out16.astype(int) - out32.astype(int))
    assert diff.mean() < 8


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert engine.resolve_precision("fp32", cpu) is None
    assert engine.resolve_precision("bf16", cpu) is torch.bfloat16
    assert engine.resolve_precision("fp16", torch.device("cuda")) is torch.float16
    assert engine.resolve_precision("auto", torch.device("cuda")) is torch.float16
    expected = torch.bfloat16 if engine.cpu_supports_bf16() else None
    assert engine.resolve_precision("auto", cpu) is expected
    with pytest.raises(MpistyleError):
        engine.resolve_precision("fp16", cpu)
    with pytest.raises(MpistyleError):
        engine.resolve_precision("int8", cpu)


def test_cpu_supports_bf16_agrees_with_cpuinfo():
    flags: set[str] = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    if flags:
        assert engine.cpu_supports_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    else:
        assert isinstance(engine.cpu_supports_bf16(), bool)


def test_submit_gives_the_call_result_and_the_device_tensor():
    frames = _frames(3, 30, 37)
    sty = Stylizer(_net(), torch.device("cpu"), precision="fp32")
    ref = sty(frames)
    first, second = sty.submit(frames[:2]), sty.submit(frames[2:], to_host=False)  # two in flight
    assert np.array_equal(first.result(), ref[:2])
    t = second.tensor()
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and tuple(t.shape) == (1, 30, 37, 3)
    assert np.array_equal(t.numpy(), ref[2:]) and np.array_equal(second.result(), ref[2:])
    assert sty(frames[:0]).shape == (0, 30, 37, 3)
    with pytest.raises(ValueError, match="N,H,W,3"):
        sty.submit(frames[0])


def test_resolve_batch_explicit_and_cpu():
    for device in ("cpu", torch.device("cpu")):
        assert engine.resolve_batch(3, device, 180, 320) == 3
        assert engine.resolve_batch("5", device, 180, 320) == 5
        for auto in ("auto", None, 0):
            assert engine.resolve_batch(auto, device, 180, 320) == engine.CPU_AUTO_BATCH
    # the free-memory figure is only read on CUDA: on CPU a huge one changes nothing
    assert engine.resolve_batch("auto", "cpu", 180, 320, free_bytes=10**15) == engine.CPU_AUTO_BATCH
    for bad in ("-1", "0.5", "many", -2):
        with pytest.raises(ValueError, match="positive integer or auto"):
            engine.resolve_batch(bad, "cpu", 180, 320)
    assert engine.parse_batch("auto") == "auto" and engine.parse_batch("7") == 7


def test_resolve_batch_cuda_arithmetic_with_a_given_free_memory():
    # No CUDA needed: free_bytes stands in for torch.cuda.mem_get_info; the arithmetic is what is tested.
    per_frame = engine.frame_memory_bytes(360, 640, torch.float16)
    assert per_frame == int(engine.AUTO_BATCH_SAFETY * (engine.PEAK_ACTIVATION_ELEMENTS_PER_PIXEL * 2
                                                        + engine.IO_BYTES_PER_PIXEL) * 360 * 640)
    # 4 frames' worth in the usable fraction of free memory -> 4
    free = int(4.5 * per_frame / engine.AUTO_BATCH_MEMORY_FRACTION)
    assert engine.resolve_batch("auto", "cuda", 360, 640, free_bytes=free) == 4
    assert engine.resolve_batch("auto", "cuda:1", 360, 640, free_bytes=free, ranks_per_device=2) == 2
    # fp32 frames cost about twice as much
    assert engine.resolve_batch("auto", "cuda", 360, 640, free_bytes=free, dtype=None) == 2
    # a big GPU is capped; a full one still gets batch 1; 1280x720 costs 4x a 640x360 frame
    assert engine.resolve_batch("auto", "cuda", 360, 640, free_bytes=80 * 2**30) == engine.CUDA_MAX_AUTO_BATCH
    assert engine.resolve_batch(None, "cuda", 360, 640, free_bytes=0) == 1
    assert engine.frame_memory_bytes(720, 1280) == pytest.approx(4 * per_frame, rel=1e-6)
    assert engine.resolve_batch("auto", "cuda", 720, 1280, free_bytes=free * 4) == 4
    assert engine.frame_memory_bytes(181, 321) == engine.frame_memory_bytes(184, 324)  # padded to multiples of 4
    assert engine.resolve_batch(6, "cuda", 360, 640, free_bytes=0) == 6  # an explicit batch is kept
    with pytest.raises(ValueError, match="ranks_per_device"):
        engine.resolve_batch("auto", "cuda", 360, 640, free_bytes=free, ranks_per_device=0)


@pytest.mark.parametrize("h,w", [(72, 128), (360, 640), (180, 320)])
def test_activation_constant_bounds_the_counted_peak(h, w):
    """The per-pixel constant behind --batch auto, against live tensor bytes counted on the meta device."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        peak = engine.peak_activation_bytes(h, w, dtype)
        per_pixel = peak / (h * w) / (torch.finfo(dtype).bits // 8)
        assert 150 < per_pixel <= engine.PEAK_ACTIVATION_ELEMENTS_PER_PIXEL
    assert engine.peak_activation_bytes(72, 128, torch.float16, batch=2) == pytest.approx(
        2 * engine.peak_activation_bytes(72, 128, torch.float16), rel=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU path is tested above)")
def test_cuda_streams_and_pinned_buffers_give_the_synchronous_result():
    frames = _frames(5, 36, 44)
    sty = Stylizer(_net(), torch.device("cuda"), precision="fp16")
    ref = np.concatenate([sty._forward(torch.from_numpy(f[None]).cuda()).cpu().numpy() for f in frames])
    pending = [sty.submit(frames[i:i + 2]) for i in range(0, 5, 2)]  # slots reused before results are read
    assert np.array_equal(np.concatenate([p.result() for p in pending]), ref)
    dev = sty.submit(frames, to_host=False).tensor()
    assert dev.device.type == "cuda" and np.array_equal(dev.cpu().numpy(), ref)
    assert engine.resolve_batch("auto", "cuda", 360, 640) >= 1


def test_stylize_cli_takes_batch_auto():
    import argparse

    from mpistyle.cli import add_stylize_arguments

    parser = argparse.ArgumentParser()
    add_stylize_arguments(parser)
    assert parser.parse_args(["in.mp4", "-o", "out.mp4", "--batch", "auto"]).batch == 0  # 0: automatic
    assert parser.parse_args(["in.mp4", "-o", "out.mp4", "--batch", "3"]).batch == 3
    assert engine.resolve_batch(0, "cpu", 180, 320) == engine.CPU_AUTO_BATCH
    with pytest.raises(SystemExit):
        parser.parse_args(["in.mp4", "-o", "out.mp4", "--batch", "0"])


# ----------------------------------------------------------------------------------------------
# PointwiseNet: the identity model that benchmarks use to measure the pipeline alone


def test_identity_model_file_round_trip(tmp_path):
    path = models.write_identity_model(str(tmp_path / "identity.pth"))
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == {"pointwise.weight", "pointwise.bias"}
    assert state["pointwise.weight"].shape == (3, 3, 1, 1) and state["pointwise.bias"].shape == (3,)
    assert torch.equal(state["pointwise.weight"].reshape(3, 3), torch.eye(3))
    assert torch.equal(state["pointwise.bias"], torch.zeros(3))
    assert model_info(path)["architecture"] == "PointwiseNet"


def test_identity_model_loads_through_load_model(tmp_path):
    path = models.write_identity_model(str(tmp_path / "identity.pth"))
    net = load_model(path)
    assert isinstance(net, nets.PointwiseNet) and not net.training
    assert all(p.dtype == torch.float32 for p in net.parameters())
    # The TransformerNet path is unchanged next to it.
    plain = tmp_path / "plain.pth"
    torch.save(_net().state_dict(), plain)
    assert isinstance(load_model(str(plain)), TransformerNet)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 72, 128), (2, 33, 50)])  # 33x50: padded to multiples of 4 and cropped
def test_identity_model_returns_the_frames_through_stylizer(tmp_path, precision, shape):
    path = models.write_identity_model(str(tmp_path / "identity.pth"))
    stylizer = Stylizer(load_model(path), device=torch.device("cpu"), precision=precision)
    frames = _frames(*shape)
    frames[0, 0, 0] = (0, 255, 128)  # the extremes survive the clamp and rounding
    out = stylizer(frames)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    assert np.array_equal(out, frames)


def test_pointwise_file_with_wrong_shapes_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"pointwise.weight": torch.zeros(3, 3, 3, 3), "pointwise.bias": torch.zeros(3)}, bad)
    with pytest.raises(MpistyleError) as info:
        load_model(str(bad))
    text = str(info.value)
    assert "\n" not in text and "PointwiseNet" in text and "pointwise.weight" in text
    assert "(3, 3, 3, 3)" in text and "(3, 3, 1, 1)" in text
    extra = tmp_path / "extra.pth"
    torch.save({"pointwise.weight": torch.zeros(3, 3, 1, 1), "pointwise.bias": torch.zeros(3),
                "pointwise.scale": torch.zeros(3)}, extra)
    with pytest.raises(MpistyleError, match="unexpected keys pointwise.scale"):
        load_model(str(extra))
