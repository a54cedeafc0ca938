"""`--show` in a real terminal: run under a pseudo-terminal of 80 x 24 and render the bytes with a VT emulator."""

import os
import pty
import select
import struct
import subprocess
import sys

import pytest

from conftest import needs

pyte = needs("pyte", "test")
fcntl = pytest.importorskip("fcntl")
termios = pytest.importorskip("termios")

COLS, ROWS = 80, 24
ENTER, LEAVE = b"\x1b[?1049h", b"\x1b[?1049l"


def _run_in_pty(argv: list[str]) -> bytes:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(master)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    return out


def _screen(data: bytes) -> list[str]:
    screen = pyte.Screen(COLS, ROWS)
    pyte.ByteStream(screen).feed(data)
    return [row.rstrip() for row in screen.display]


def _wrapped(text: str) -> list[str]:
    rows = []
    for line in text.split("\n"):
        rows += [line[i:i + COLS] for i in range(0, max(len(line), 1), COLS)]
    return rows


def test_live_view_redraws_a_wrapping_canvas_cleanly_and_prints_the_text_once(tiny_model_dir):
    out = _run_in_pty([sys.executable, "-m", "mlx_dlm.generate", "--model", str(tiny_model_dir), "--prompt", "ROMEO:",
                       "--max-tokens", "128", "--steps", "8", "--seed", "0", "--show", "--verbose", "false"])
    assert out.count(ENTER) == 1 and out.count(LEAVE) == 1  # frames live in the alternate screen
    before, rest = out.split(ENTER)
    frames, after = rest.split(LEAVE)
    final_text = after.decode().replace("\r\n", "\n").strip("\n")
    assert final_text.startswith("ROMEO:") and len(final_text) == len("ROMEO:") + 128
    # What the terminal shows once the command is done: the final text, once.
    normal = "\n".join(_screen(before + after))
    assert normal.count("ROMEO:") == 1 and _wrapped(final_text)[-1].rstrip() in normal
    # The last frame fills the alternate screen from its top: the wrapped canvas, the status line, nothing stale.
    shown = _screen(frames)
    canvas = _wrapped(final_text)
    assert shown[:len(canvas)] == [row.rstrip() for row in canvas]
    assert shown[len(canvas)].startswith("step 8: 128 decided, 8 forward passes")
    assert all(row == "" for row in shown[len(canvas) + 1:])
