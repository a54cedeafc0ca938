"""A live view of denoising (terminal) and saved frames (HTML, or GIF with Pillow)."""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import TextIO

from .errors import UserError
from .fileio import atomic_write, atomic_write_text
from .sample import GenerationStep

PLACEHOLDER = "\u2591"  # light shade: a position still masked
DIM, BOLD_GREEN, RED, RESET = "\x1b[2m", "\x1b[1;32m", "\x1b[31m", "\x1b[0m"


def cells(step: GenerationStep, tokenizer, sample: int = 0) -> list[tuple[str, str]]:
    """(text, kind) per position of one sample; kind is given, masked, new, remasked or done."""
    out = []
    for i, token in enumerate(step.tokens[sample].tolist()):
        if step.remasked[sample, i]:
            out.append((PLACEHOLDER, "remasked"))
        elif token == tokenizer.mask_id:
            out.append((PLACEHOLDER, "masked"))
        else:
            kind = "given" if not step.editable[i] else "new" if step.committed[sample, i] else "done"
            out.append((tokenizer.decode([token]), kind))
    return out


ENTER_SCREEN, LEAVE_SCREEN = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"  # alternate screen, cursor off/on
HOME_AND_CLEAR = "\x1b[H\x1b[J"


class TerminalView:
    """Redraws the canvas on a terminal; prints plain numbered frames otherwise.

    On a terminal the frames are drawn in its alternate screen, each from the top-left corner, so a canvas that
    wraps over many lines redraws cleanly at any width; `close()` returns to the normal screen as it was, where
    the caller prints the final text once."""

    def __init__(self, tokenizer, stream: TextIO | None = None):
        self.tokenizer = tokenizer
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.started = False

    def render(self, step: GenerationStep) -> str:
        """The frame's text (ANSI-coloured when live)."""
        if not self.live:
            return "".join(text for text, _ in cells(step, self.tokenizer))
        style = {"masked": DIM, "new": BOLD_GREEN, "remasked": RED}
        return "".join(f"{style[k]}{t}{RESET}" if k in style else t for t, k in cells(step, self.tokenizer))

    def draw(self, step: GenerationStep) -> None:
        """Show one step."""
        body = self.render(step)
        status = f"step {step.step}: {step.generated_tokens} decided, {step.nfe} forward passes"
        if self.live:
            if not self.started:
                self.stream.write(ENTER_SCREEN)
                self.started = True
            self.stream.write(f"{HOME_AND_CLEAR}{body}\n{DIM}{status}{RESET}\n")
        else:
            self.stream.write(f"--- {status}\n{body}\n")
        self.stream.flush()

    def close(self) -> None:
        """Leave the alternate screen (the terminal shows what it showed before the first frame)."""
        if self.started:
            self.stream.write(LEAVE_SCREEN)
            self.stream.flush()
            self.started = False


def save_frames(path: str | Path, steps: list[GenerationStep], tokenizer) -> None:
    """Write the denoising of sample 0 as a self-contained HTML player, or an animated GIF (needs Pillow)."""
    path = Path(path)
    frames = [cells(s, tokenizer) for s in steps]
    if path.suffix.lower() == ".gif":
        _save_gif(path, frames)
    elif path.suffix.lower() in (".html", ".htm"):
        atomic_write_text(path, _html(frames))
    else:
        raise UserError(f"--save-frames {path}: use a .html or .gif file name")


def _html(frames: list[list[tuple[str, str]]]) -> str:
    rendered = ["".join(f'<span class="{k}">{html.escape(t)}</span>' for t, k in frame) for frame in frames]
    return f"""<!doctype html>
<meta charset="utf-8"><title>mlx-dlm denoising</title>
<style>
body {{ font-family: ui-monospace, Menlo, monospace; background: #111; color: #ddd; margin: 2em; }}
pre {{ white-space: pre-wrap; font-size: 15px; line-height: 1.4; }}
.masked {{ color: #555; }} .new {{ color: #6f6; font-weight: bold; }} .remasked {{ color: #f66; }}
.given {{ color: #9cf; }}
</style>
<p>mlx-dlm: step <span id="n">1</span> / {len(frames)}
<input id="s" type="range" min="0" max="{len(frames) - 1}" value="0"> <button id="p">play</button></p>
<pre id="f"></pre>
<script>
const frames = {json.dumps(rendered)};
const f = document.getElementById("f"), s = document.getElementById("s"), n = document.getElementById("n");
function show(i) {{ f.innerHTML = frames[i]; s.value = i; n.textContent = i + 1; }}
s.oninput = () => show(+s.value);
document.getElementById("p").onclick = () => {{
  let i = 0; const t = setInterval(() => {{ show(i++); if (i >= frames.length) clearInterval(t); }}, 250);
}};
show(frames.length - 1);
</script>
"""


def _layout(frame: list[tuple[str, str]], width: int) -> list[tuple[int, int, str, str]]:
    """(column, row, character, kind) of a frame wrapped at width columns."""
    out, col, row = [], 0, 0
    for text, kind in frame:
        for ch in text:
            if ch == "\n":
                col, row = 0, row + 1
                continue
            if col >= width:
                col, row = 0, row + 1
            out.append((col, row, ch, kind))
            col += 1
    return out


def _save_gif(path: Path, frames: list[list[tuple[str, str]]], width: int = 80) -> None:
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise UserError("--save-frames .gif needs Pillow (pip install pillow); .html works without it") from None
    font = ImageFont.load_default()
    colours = {"masked": "#555555", "new": "#66ff66", "remasked": "#ff6666", "given": "#99ccff", "done": "#dddddd"}
    layouts = [_layout(frame, width) for frame in frames]
    rows = 1 + max((cell[1] for layout in layouts for cell in layout), default=0)
    cw, lh = 7, 14
    images = []
    for layout in layouts:
        img = Image.new("RGB", (cw * width + 20, lh * rows + 20), "#111111")
        draw = ImageDraw.Draw(img)
        for col, row, ch, kind in layout:
            draw.text((10 + col * cw, 10 + row * lh), ch, fill=colours[kind], font=font)
        images.append(img)
    atomic_write(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                                                  duration=250, loop=0))
