"""The documentation cannot drift from the code: README.md and docs/*.md are checked against the real parsers
and the repository.

- Every ``mpistyle ...`` command in a shell code block (``bash``, ``sh``, ``console``, ``shell`` or no
  language; ``text`` blocks are output, such as the usage lines of docs/cli.md) and in inline code parses
  with ``mpistyle.cli.build_parser()``, once launchers (``mpiexec -n 8``, ``srun --mpi=pmi2 -n 16``,
  ``nice -n 10``), environment assignments, prompts and trailing comments are stripped. A command that
  elides its arguments (``...``) or only names a subcommand is checked for its subcommand and options.
- Every ``--option`` after ``mpistyle SUB`` on a line is an option of ``mpistyle SUB``, spelled in full
  (argparse would accept a unique prefix; the docs must not).
- docs/cli.md is what bin/gen-cli-docs writes from the parsers now, and names every option of every
  subcommand.
- Every backticked repository path (``bin/x``, ``mpistyle/y.py``, ``slurm/z.sbatch``, ``docs/...``,
  ``temporal/kernels_torch.py``, ``tests/test_x.py::test_name``) exists, and every backticked dotted name
  of mpistyle's (``mpistyle.temporal.kernels_torch.TorchFusion``, ``partition.Anchors``) resolves.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpistyle.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
LAUNCHERS = {"mpiexec", "mpirun", "srun", "nice", "time", "nohup", "exec", "timeout"}
# Launcher options that take a value (mpiexec -n 8, srun --ntasks 4, nice -n 10, timeout 600).
LAUNCHER_VALUE_OPTS = {"-n", "-np", "-N", "--ntasks", "--nodes", "-c", "--cpus-per-task", "-ppn", "--host",
                       "-hosts", "-bind-to", "-f", "--hostfile", "--mpi", "--launcher-args"}
SHELL_ENDS = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1", "<"}
# Top-level folders and files whose backticked mentions must exist.
PATH_RE = re.compile(r"^(?:bin|mpistyle|slurm|docs|tests|\.ci)/[\w.*/-]*(?:::\w+)?$|"
                     r"^(?:io|temporal|training|stylize|bench)/\w+\.py$|"
                     r"^(?:README\.md|CHANGELOG\.md|CITATION\.cff|LICENSE|setup\.cfg|pyproject\.toml|mkdocs\.yml)$")
FILE_SUFFIXES = (".py", ".md", ".h", ".jpg", ".png", ".mp4", ".h5", ".pth", ".json", ".sbatch", ".cfg", ".toml",
                 ".yml", ".cff", ".txt", ".log", ".mkv", ".mov", ".webm", ".zip", ".gz")
# Every module of the package by its last name (kernels_torch -> mpistyle.temporal.kernels_torch), so that a
# backticked `kernels_torch.TorchFusion` or `partition.Anchors` resolves, and `fusion_torch.TorchFusion` does not.
MODULES: dict[str, list[str]] = {}
for _path in sorted((ROOT / "mpistyle").rglob("*.py")):
    _parts = list(_path.relative_to(ROOT).with_suffix("").parts)
    if _parts[-1] == "__init__":
        _parts.pop()
    MODULES.setdefault(_parts[-1], []).append(".".join(_parts))
# Dotted names of other libraries that the docs mention by a short alias.
FOREIGN_ALIASES = {"nn", "F", "np", "cv2", "torch", "h5py", "openvino", "os", "sys"}


@dataclass(frozen=True)
class Mention:
    file: str
    line: int
    text: str
    inline: bool

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def _code_blocks_and_spans(path: Path) -> tuple[list[Mention], list[Mention]]:
    """Shell lines of fenced code blocks (continuations joined) and inline code spans outside blocks (a span
    may wrap onto the next line of its paragraph, as in Markdown)."""
    lines: list[Mention] = []
    prose: list[str] = []  # the file with fenced blocks blanked out, so line numbers stay
    fence: str | None = None
    lang = ""
    pending, start = "", 0
    rel = str(path.relative_to(ROOT))
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if fence is None:
            m = re.match(r"^(```+|~~~+)\s*([\w+-]*)", stripped)
            if m:
                fence, lang = m.group(1), m.group(2).lower()
                prose.append("")
                continue
            prose.append(raw)
            continue
        prose.append("")
        if stripped.startswith(fence):
            fence = None
            continue
        if lang not in SHELL_LANGS:
            continue
        if not pending:
            start = n
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(Mention(rel, start, (pending + stripped).strip(), False))
        pending = ""
    text = "\n".join(prose)
    spans = [Mention(rel, text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()), True)
             for m in re.finditer(r"(?<!`)`((?:[^`\n]|\n(?![ \t]*\n))+)`(?!`)", text)]
    return lines, spans


def _all_mentions() -> tuple[list[Mention], list[Mention]]:
    lines: list[Mention] = []
    spans: list[Mention] = []
    for path in DOCS:
        a, b = _code_blocks_and_spans(path)
        lines += a
        spans += b
    return lines, spans


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("mpistyle's parser has no subcommands")


PARSER = build_parser()
SUBS = _subparsers(PARSER)
GLOBAL_OPTS = {s for a in PARSER._actions for s in a.option_strings}


def _options(sub: str) -> set[str]:
    return {s for a in SUBS[sub]._actions for s in a.option_strings}


def mpistyle_commands(text: str) -> list[list[str]]:
    """The argument lists given to `mpistyle` in one shell line (``a && b`` may hold several)."""
    text = re.sub(r"^\$\s+", "", text.strip())
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        return []
    found: list[list[str]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in ("mpistyle", "bin/mpistyle") or (tok == "-m" and i > 0 and i + 1 < len(tokens)
                                                     and tokens[i + 1] == "mpistyle"):
            i += 2 if tok == "-m" else 1
            args = []
            while i < len(tokens) and tokens[i] not in SHELL_ENDS and not tokens[i].startswith((">", "2>")):
                args.append(tokens[i])
                i += 1
            found.append(args)
        i += 1
    return found


def _is_command(text: str) -> bool:
    """Inline code that runs mpistyle (not a path such as mpistyle/data/sample.mp4 or a dotted name)."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        return False
    tokens = [t for t in tokens if not re.match(r"^[A-Z_][A-Z0-9_]*=", t)]
    return bool(tokens) and (tokens[0] in ("mpistyle", "bin/mpistyle") or
                             (tokens[0] in LAUNCHERS and "mpistyle" in tokens))


def check_command(args: list[str]) -> str | None:
    """None if ``mpistyle ARGS`` is a valid command line, else why not."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] not in GLOBAL_OPTS:
            return f"{args[i]} is not an option of mpistyle"
        if args[i] in ("-h", "--help", "--version"):
            return None
        i += 1
    if i == len(args):
        return None  # the program named alone, or with global options only
    sub, rest = args[i], args[i + 1:]
    if sub not in SUBS:
        return f"{sub!r} is not an mpistyle subcommand (one of {', '.join(SUBS)})"
    known = _options(sub)
    for tok in rest:
        if tok.startswith("--") and len(tok) > 2:
            name = tok.split("=", 1)[0]
            if name not in known:
                return f"{name} is not an option of `mpistyle {sub}`"
        elif re.match(r"^-[a-zA-Z]$", tok) and tok not in known:
            return f"{tok} is not an option of `mpistyle {sub}`"
    if not rest or "..." in rest or any(t in ("-h", "--help") for t in rest):
        return None  # a mention of the subcommand, or elided arguments: the options above are what to check
    try:
        PARSER.parse_args(args)
    except SystemExit as exc:
        return f"the parser rejects it (exit {exc.code})"
    return None


def _command_mentions() -> list[tuple[Mention, list[str]]]:
    lines, spans = _all_mentions()
    found = []
    for m in lines:
        found += [(m, args) for args in mpistyle_commands(m.text)]
    for m in spans:
        if _is_command(m.text):
            found += [(m, args) for args in mpistyle_commands(m.text)]
    return found


def test_the_docs_hold_mpistyle_commands():
    """The checks below have something to check: the README's quick start is among the commands."""
    commands = _command_mentions()
    assert len(commands) > 30, f"only {len(commands)} mpistyle commands found in the docs"
    assert any(m.file == "README.md" and args[:2] == ["stylize", "mpistyle/data/sample.mp4"] for m, args in commands)


def test_every_documented_mpistyle_command_parses(capsys):
    bad = []
    for mention, args in _command_mentions():
        why = check_command(args)
        if why:
            bad.append(f"{mention}\n    mpistyle {' '.join(args)}: {why}")
    capsys.readouterr()  # the parser's own error lines
    assert not bad, "documented commands that mpistyle rejects:\n" + "\n".join(bad)


def test_check_command_rejects_wrong_options_and_accepts_right_ones():
    assert check_command(["stylize", "IN.mp4", "-o", "OUT.mp4", "--temporal", "none"]) is None
    assert check_command(["stylize", "IN.mp4", "-o", "OUT.mp4", "--ceiling-temporal", "flow"]) is not None
    assert check_command(["stylize", "IN.mp4", "-o", "OUT.mp4", "--temp", "none"]) is not None  # a prefix
    assert check_command(["stylize", "IN.mp4"]) is not None  # -o is required
    assert check_command(["train", "--style", "x.jpg", "..."]) is None
    assert check_command(["bench", "--ceiling-temporal", "flow"]) is None
    assert check_command(["paint"]) is not None
    assert mpistyle_commands("MPISTYLE_VENV=$PWD/.venv srun --mpi=pmi2 -n 16 mpistyle stylize a.mp4 -o b.mp4 "
                             "# comment") == [["stylize", "a.mp4", "-o", "b.mp4"]]
    assert mpistyle_commands("pip install x && mpiexec -n 2 mpistyle models > list.txt") == [["models"]]


def _generator():
    """bin/gen-cli-docs as a module (in this process: the parsers are already imported)."""
    loader = importlib.machinery.SourceFileLoader("gen_cli_docs", str(ROOT / "bin" / "gen-cli-docs"))
    spec = importlib.util.spec_from_loader("gen_cli_docs", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_generated_cli_reference_is_up_to_date():
    """docs/cli.md is what bin/gen-cli-docs makes of the parsers now (rerun it after changing an option)."""
    expected = _generator().render()
    actual = (ROOT / "docs" / "cli.md").read_text()
    assert actual == expected, "docs/cli.md is out of date: run bin/gen-cli-docs and commit it"


def test_every_option_of_every_subcommand_is_documented():
    reference = (ROOT / "docs" / "cli.md").read_text()
    missing = []
    for sub, parser in SUBS.items():
        section = reference.split(f"## mpistyle {sub}\n", 1)
        if len(section) != 2:
            missing.append(f"mpistyle {sub} (no section)")
            continue
        body = section[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help") and f"`{opt}`" not in body:
                    missing.append(f"mpistyle {sub} {opt}")
    assert not missing, "options missing from docs/cli.md: " + ", ".join(missing)


def _path_exists(text: str) -> bool:
    text = text.rstrip("/")
    path, _, test = text.partition("::")
    if re.match(r"^(?:io|temporal|training|stylize|bench)/", path):
        path = "mpistyle/" + path
    # Upper-case placeholders (NAME, OUT) and globs match any existing file.
    pattern = re.sub(r"[A-Z][A-Z0-9_]+", "*", path) if not path.startswith(("README", "CHANGELOG", "CITATION",
                                                                             "LICENSE")) else path
    matches = sorted(ROOT.glob(pattern)) if any(c in pattern for c in "*?[") else \
        ([ROOT / pattern] if (ROOT / pattern).exists() else [])
    if not matches:
        return False
    if test:
        return any(re.search(rf"^\s*(?:async\s+)?def {re.escape(test)}\(", m.read_text(), re.M) for m in matches
                   if m.is_file())
    return True


def _resolve_in(module: str, attrs: list[str]) -> bool:
    try:
        obj = importlib.import_module(module)
    except ImportError:
        return False
    for i, attr in enumerate(attrs):
        if not hasattr(obj, attr):
            # a submodule not imported by its package yet
            try:
                obj = importlib.import_module(f"{module}.{'.'.join(attrs[:i + 1])}")
                continue
            except ImportError:
                return False
        obj = getattr(obj, attr)
    return True


def _resolves(dotted: str) -> bool:
    """`mpistyle.a.b.C`, or `leaf.C` where leaf is a module of the package (any of that name will do)."""
    first, *rest = dotted.split(".")
    if first == "mpistyle":
        return _resolve_in("mpistyle", rest)
    return any(_resolve_in(module, rest) for module in MODULES.get(first, []))


def _is_ours(dotted: str) -> bool:
    """A dotted name the docs give as mpistyle's (not a file name, not another library's name)."""
    first = dotted.split(".")[0]
    if first == "mpistyle" or first in MODULES:
        return True
    if first in FOREIGN_ALIASES or not re.match(r"^[a-z][a-z0-9_]*$", first):
        return False  # another library's alias, or a placeholder such as OUT.mpistyle.h5 or vX.Y.Z
    try:
        importlib.import_module(first)
        return False  # another library (torch.compile, h5py.File)
    except ImportError:
        return True  # names no module at all: a broken reference such as fusion_torch.TorchFusion


def _paths_and_names() -> tuple[list[Mention], list[Mention]]:
    lines, spans = _all_mentions()
    paths, names = [], []
    for m in spans:
        text = m.text
        if " " in text:
            continue
        if PATH_RE.match(text):
            paths.append(m)
        elif re.match(r"^\w+\.py$", text):
            paths.append(m)  # a module file named alone: it must exist somewhere in the package
        elif re.match(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$", text) and not text.endswith(FILE_SUFFIXES):
            if _is_ours(text):
                names.append(m)
    # Repository paths given to commands in code blocks (slurm/stylize-cpu.sbatch, tests/data/...).
    for m in lines:
        try:
            tokens = shlex.split(m.text, comments=True)
        except ValueError:
            continue
        paths += [Mention(m.file, m.line, t, False) for t in tokens
                  if re.match(r"^(?:bin|slurm|tests|mpistyle|docs)/[\w./-]+$", t) and "%" not in t]
    return paths, names


def test_every_backticked_path_exists():
    paths, _ = _paths_and_names()
    assert len(paths) > 20
    dead = []
    for m in paths:
        if re.match(r"^\w+\.py$", m.text):
            if not list((ROOT / "mpistyle").rglob(m.text)) and not (ROOT / m.text).exists():
                dead.append(str(m))
        elif not _path_exists(m.text):
            dead.append(str(m))
    assert not dead, "paths in the docs that do not exist:\n" + "\n".join(dead)


def test_every_backticked_module_symbol_resolves():
    _, names = _paths_and_names()
    assert any(m.text.startswith("mpistyle.") for m in names)
    dead = [str(m) for m in names if not _resolves(m.text)]
    assert not dead, "names in the docs that do not resolve in mpistyle:\n" + "\n".join(dead)


@pytest.mark.parametrize("path", [p.relative_to(ROOT) for p in DOCS], ids=str)
def test_docs_have_no_reference_to_missing_readme_sections(path):
    """The README is short now: links into it by anchor point at sections that must exist."""
    text = (ROOT / path).read_text()
    anchors = re.findall(r"\]\((?:\.\./)?README\.md#([\w-]+)\)", text)
    readme = (ROOT / "README.md").read_text()
    heads = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.*)$", readme, re.M)}
    assert not [a for a in anchors if a not in heads]
