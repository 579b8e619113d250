"""Bad input under `mpiexec -n 2`: one clear line, non-zero exit, no traceback, no hang, no output."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from mpistyle.io.ffmpeg import ffmpeg_exe

from .conftest import BBB, run_mpistyle


class _Payload:
    """Unpickling this runs `touch <marker>`: a model file must never get that far."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _make(tmp: Path, case: str) -> tuple[list[str], str]:
    """Build the bad input for ``case``: (arguments after `stylize`, expected words in the error)."""
    out = str(tmp / "out.mp4")
    clip = str(BBB)
    if case == "missing file":
        return [str(tmp / "nope.mp4"), "-o", out], "no such file"
    if case == "directory":
        return [str(tmp), "-o", out], "directory"
    if case == "empty file":
        (tmp / "empty.mp4").write_bytes(b"")
        return [str(tmp / "empty.mp4"), "-o", out], "empty"
    if case == "text named .mp4":
        (tmp / "text.mp4").write_text("hello, I am not a video\n" * 50)
        return [str(tmp / "text.mp4"), "-o", out], "not a readable video"
    if case == "truncated video":
        (tmp / "cut.mp4").write_bytes(BBB.read_bytes()[: len(BBB.read_bytes()) // 2])
        return [str(tmp / "cut.mp4"), "-o", out], "cut.mp4"
    if case == "zero frames":
        subprocess.run([ffmpeg_exe(), "-v", "error", "-i", clip, "-frames:v", "0", "-c:a", "copy",
                        str(tmp / "zero.mp4")], check=True)
        return [str(tmp / "zero.mp4"), "-o", out], "zero.mp4"
    if case == "audio only":
        subprocess.run([ffmpeg_exe(), "-v", "error", "-i", clip, "-vn", "-c:a", "copy", str(tmp / "audio.m4a")],
                       check=True)
        return [str(tmp / "audio.m4a"), "-o", out], "no video"
    if case == "missing model":
        return [clip, "-o", out, "--model", str(tmp / "none.pth")], "not found"
    if case == "corrupt model":
        (tmp / "bad.pth").write_bytes(os.urandom(4096))
        return [clip, "-o", out, "--model", str(tmp / "bad.pth")], "bad.pth"
    if case == "wrong architecture":
        torch.save(torch.nn.Linear(3, 3).state_dict(), tmp / "linear.pth")
        return [clip, "-o", out, "--model", str(tmp / "linear.pth")], "linear.pth"
    if case == "pickle payload":
        marker = tmp / "PWNED"
        with open(tmp / "evil.pth", "wb") as f:
            pickle.dump({"conv1.conv2d.weight": _Payload(str(marker))}, f)
        torch.save({"x": _Payload(str(marker))}, tmp / "evil2.pth")
        return [clip, "-o", out, "--model", str(tmp / "evil2.pth")], "evil2.pth"
    if case == "unknown bundled model":
        return [clip, "-o", out, "--model", "no-such-style"], "unknown model"
    if case == "output dir missing":
        return [clip, "-o", str(tmp / "no" / "dir" / "out.mp4")], "does not exist"
    if case == "output unwritable":
        ro = tmp / "ro"
        ro.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
        return [clip, "-o", str(ro / "out.mp4")], "cannot write"
    if case == "output is input":
        copy = tmp / "in.mp4"
        copy.write_bytes(BBB.read_bytes())
        return [str(copy), "-o", str(copy)], "same file"
    if case == "output is a directory":  # one holding other files: an empty or new one takes PNG frames
        return [clip, "-o", str(tmp.parent)], "directory"
    if case == "output not a video name":
        return [clip, "-o", str(tmp / "out.txt")], "must end in"
    if case == "width zero":
        return [clip, "-o", out, "--width", "0"], "must be positive"
    if case == "width negative":
        return [clip, "-o", out, "--width", "-5"], "--width"
    if case == "width huge":
        return [clip, "-o", out, "--width", "100000"], "100000"
    if case == "scale absurd":
        return [clip, "-o", out, "--scale", "1000"], "exceeds the maximum"
    if case == "unknown option":
        return [clip, "-o", out, "--frobnicate"], "unrecognized arguments: --frobnicate"
    if case == "cuda without gpu":
        return [clip, "-o", out, "--device", "cuda"], "CUDA"
    raise AssertionError(case)


CASES = ["missing file", "directory", "empty file", "text named .mp4", "truncated video", "zero frames",
         "audio only", "missing model", "corrupt model", "wrong architecture", "pickle payload",
         "unknown bundled model", "output dir missing", "output unwritable", "output is input",
         "output is a directory", "output not a video name", "width zero", "width negative", "width huge",
         "scale absurd", "unknown option"]
if not torch.cuda.is_available():
    CASES.append("cuda without gpu")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_line(tmp_path, case) -> None:
    work = tmp_path / "w"
    work.mkdir()
    args, expected = _make(work, case)
    try:
        before = set(os.listdir(work))
        proc = run_mpistyle(["stylize", *args, "--no-progress"], ranks=2, timeout=120)
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        assert proc.returncode == 2, (proc.returncode, proc.stderr)
        assert len(lines) == 1, proc.stderr  # one line, printed once (not once per rank)
        assert "error" in lines[0] and expected.lower() in lines[0].lower(), lines[0]
        assert "Traceback" not in proc.stderr + proc.stdout
        created = set(os.listdir(work)) - before
        assert not {name for name in created if name.startswith("out") or name.endswith(".h5")}, created
        assert not (work / "PWNED").exists()
    finally:
        if case == "output unwritable":
            subprocess.run(["umount", "-l", str(work / "ro")], check=False)
