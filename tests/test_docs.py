"""The front page and docs/: every relative link resolves, and every command in a bash block parses with the
flags its command really has (the command's own argparse parser; nothing is run)."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What `mlx_dlm X` / `mlx_dlm.X` runs -> the module whose setup_arg_parser() parses its flags.
PARSERS = {"train": "mlx_dlm.train", "generate": "mlx_dlm.generate", "eval": "mlx_dlm.eval", "chat": "mlx_dlm.chat",
           "server": "mlx_dlm.server", "export": "mlx_dlm.export", "upload": "mlx_dlm.upload",
           "convert": "mlx_dlm.convert.__main__", "benchmark": "mlx_dlm.benchmark.throughput",
           "benchmark train": "mlx_dlm.benchmark.train_speed", "benchmark learn": "mlx_dlm.benchmark.learn",
           "benchmark profile": "mlx_dlm.benchmark.profile", "benchmark passes": "mlx_dlm.benchmark.pass_cost",
           "benchmark layout": "mlx_dlm.benchmark.layout",
           "benchmark simple-dlm-sampler": "mlx_dlm.benchmark.sampler_speed"}
COMMAND = re.compile(r"^(?:python -m )?mlx_dlm[. ](\w+)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def links(page: Path) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)\s]+)\)", page.read_text()) if not re.match(r"[a-z]+:", m)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for link in links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in anchors(target)):
            broken.append(link)
    assert broken == []


def _bash_blocks(page: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The mlx_dlm command lines of a bash block as argv lists: continuations joined, comments, pipes and `&&`
    split off, shell variables assigned in the block substituted, usage synopses ([--flag VALUE]) and elided lines (`...`) left out."""
    variables, found = {}, []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 1 and re.match(r"^\w+=", words[0]):
            name, _, value = words[0].partition("=")
            variables[name] = value
            continue
        line = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), line)  # as the shell expands it
        for part in re.split(r"\s(?:\||&&|;)\s", line):
            part = part.split(" -- ", 1)[-1].strip()  # mlx.launch ... -- mlx_dlm.train ...
            argv = shlex.split(part, comments=True) if COMMAND.match(part) else []
            if argv and not any(w.startswith("[") or "..." in w for w in argv):  # synopses and elisions aside
                found.append(argv)
    return found


def _parser_of(argv: list[str]) -> tuple[str, list[str]]:
    """(module, flags) of one command line."""
    words = argv[2:] if argv[0] == "python" else argv
    name, rest = (words[0].split(".", 1)[1], words[1:]) if words[0] != "mlx_dlm" else (words[1], words[2:])
    if name == "benchmark" and rest and f"benchmark {rest[0]}" in PARSERS:
        name, rest = f"benchmark {rest[0]}", rest[1:]
    return PARSERS[name], rest


ALL_COMMANDS = [(page.name, argv) for page in PAGES for block in _bash_blocks(page) for argv in commands(block)]


def test_the_docs_have_commands_to_check():
    assert len(ALL_COMMANDS) > 40 and {p for p, _ in ALL_COMMANDS} >= {"README.md", "training.md", "sampling.md",
                                                                       "models.md", "server.md", "benchmarks.md"}


def test_command_extraction_on_a_known_block():
    block = ('S="--arch dim=8"\nmlx_dlm.train --preset tiny $S \\\n  --iters 3   # a comment\n'
             "mlx_dlm.eval --model DIR [--json OUT]\nmlx_dlm.train ... --seed 1\nmlx.launch -n 2 -- mlx_dlm.train --iters 1 | head -3\n")
    assert commands(block) == [["mlx_dlm.train", "--preset", "tiny", "--arch", "dim=8", "--iters", "3"],
                               ["mlx_dlm.train", "--iters", "1"]]


@pytest.mark.parametrize("page, argv", ALL_COMMANDS, ids=lambda v: " ".join(v)[:60] if isinstance(v, list) else v)
def test_every_documented_command_parses(page, argv, capsys):
    module, flags = _parser_of(argv)
    parser = importlib.import_module(module).setup_arg_parser()
    try:
        parser.parse_args(flags)
    except SystemExit as exc:  # --help exits 0; a bad flag exits 2 with the reason on stderr
        assert exc.code == 0, capsys.readouterr().err


def test_a_flag_the_command_lacks_is_caught():
    module, flags = _parser_of(["mlx_dlm", "benchmark", "train", "--steps", "3", "--no-such-flag"])
    assert module == "mlx_dlm.benchmark.train_speed"
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).setup_arg_parser().parse_args(flags)
    assert exc.value.code == 2
