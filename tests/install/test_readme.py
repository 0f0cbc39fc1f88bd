"""README.md and docs/*.md stay short, current and true to the tree: plain file reads, no
subprocess.

* README.md has at most MAX_README_LINES lines.
* No commit hash in README prose: a word of 7-40 lowercase hex characters holding at least one
  digit and one letter a-f is a hash; only table rows (lines starting with "|", where the
  provenance of a table lives) may carry one.
* Every repository path README.md or a docs/*.md page names exists: in inline code spans (each
  whitespace-separated word) and in Markdown links/images. A word is a path when it is made of
  path characters only (letters, digits, ``_ . - / ~ *``), holds a letter, does not start with
  "-" (a flag), and contains "/" or ends in one of PATH_SUFFIXES. Not checked: URLs, absolute
  paths (the system's, not the repository's), <placeholders>, and what the documented commands
  write (OUTPUT_PREFIXES). Code words are looked up from the repository root or the page's
  folder; link targets from the page's folder, as a Markdown renderer resolves them. "*" globs.
  A code span that is not a path but holds "/" (``bf16/fp16``) is written without backticks.
* The quickstart markers enclose exactly one ```bash block (its commands are run elsewhere).
"""
from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import ROOT

README = ROOT / "README.md"
MAX_README_LINES = 250
PATH_SUFFIXES = (".py", ".md", ".png", ".sh", ".txt", ".toml", ".jsonl")
OUTPUT_PREFIXES = ("runs/", "data/", "~/", "/imagenet", "/shared")
QUICKSTART_OPEN, QUICKSTART_CLOSE = "<!-- quickstart -->", "<!-- /quickstart -->"

HASH = re.compile(r"(?<![0-9A-Za-z_])[0-9a-f]{7,40}(?![0-9A-Za-z_])")
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PATH_WORD = re.compile(r"[A-Za-z0-9_.~/*-]+")


def commit_hashes(text: str) -> list[tuple[int, str]]:
    """(line number, word) of every commit-hash-like word outside table rows."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("|"):
            continue
        found += [(number, word) for word in HASH.findall(line)
                  if re.search(r"[0-9]", word) and re.search(r"[a-f]", word)]
    return found


def looks_like_path(word: str) -> bool:
    word = word.strip(".,;:")  # sentence punctuation around a code word
    return (bool(PATH_WORD.fullmatch(word)) and bool(re.search(r"[A-Za-z]", word))
            and not word.startswith("-")
            and ("/" in word or word.endswith(PATH_SUFFIXES)))


def exempt(target: str) -> bool:
    return ("://" in target or target.startswith(("/", "#", "mailto:")) or "<" in target
            or target.startswith(OUTPUT_PREFIXES))


def exists(path: str, bases: list[Path]) -> bool:
    path = path.split("#")[0].rstrip("/") or "."
    for base in bases:
        if "*" in path:
            if any(base.glob(path)):
                return True
        elif (base / path).exists():
            return True
    return False


def named_paths(text: str) -> list[tuple[str, str]]:
    """("code" | "link", path) for each path-like word of the page's code spans and links."""
    prose = FENCE.sub("", text)
    names = [("link", target) for target in LINK.findall(prose)]
    prose = LINK.sub("", prose)
    for _, span in CODE_SPAN.findall(prose):
        names += [("code", word.strip(".,;:")) for word in span.split()
                  if looks_like_path(word)]
    return names


def missing_paths(page: Path, root: Path = ROOT) -> list[str]:
    text = page.read_text(encoding="utf-8")
    missing = []
    for kind, name in named_paths(text):
        if exempt(name):
            continue
        bases = [page.parent] if kind == "link" else [root, page.parent]
        if not exists(name, bases):
            missing.append(f"{page.relative_to(root)}: {kind} {name}")
    return missing


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_no_commit_hash_in_readme_prose():
    found = commit_hashes(README.read_text(encoding="utf-8"))
    assert not found, ("commit hashes outside table rows (provenance goes in a table row; "
                       f"history in git): {found}")


def test_hash_rule_catches_prose_and_spares_tables_and_numbers():
    assert commit_hashes("measured at commit 767caed on 2 cores") == [(1, "767caed")]
    assert commit_hashes("fixed in b5a021a.") == [(1, "b5a021a")]
    assert commit_hashes("| cross | 773 | 2026-12-01 | 767caed |") == []
    # dates, plain numbers, hex-free or digit-free words, identifiers are not hashes
    assert commit_hashes("2026-12-01, 1048576 rows, deadbeef, sm_90a, 1e-12, 128x128x64") == []


def test_named_paths_exist():
    missing = [entry for page in pages() for entry in missing_paths(page)]
    assert not missing, f"named but not in the repository: {missing}"


def test_path_check_sees_code_words_and_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "gpu_check.sh").write_text("")
    (tmp_path / "docs" / "loss.md").write_text("")
    page = tmp_path / "docs" / "page.md"
    page.write_text("Run `bash bench/gpu_check.sh` and `python bench/bogus.py`; see "
                    "[the loss](loss.md), [gone](gone.md), `--out/x`, `runs/q/metrics.jsonl`, "
                    "`<out>/a.png`, [web](https://example.org/x.md), `torch.library`.\n"
                    "```bash\nignored/in/fences.py\n```\n")
    assert sorted(missing_paths(page, tmp_path)) == ["docs/page.md: code bench/bogus.py",
                                                     "docs/page.md: link gone.md"]


def test_quickstart_block():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines.count(QUICKSTART_OPEN) == 1 and lines.count(QUICKSTART_CLOSE) == 1, \
        "the quickstart markers must stand on their own lines, once each"
    start, end = lines.index(QUICKSTART_OPEN), lines.index(QUICKSTART_CLOSE)
    inside = [line for line in lines[start + 1:end] if line.strip()]
    assert inside and inside[0] == "```bash" and inside[-1] == "```", inside
    assert sum(line.startswith("```") for line in inside) == 2, "one fenced block, no more"
    assert len(inside) > 2, "the block holds commands"


def layout_paths(text: str) -> list[str]:
    """The first word of each line of the fenced block under README's "## Layout" heading: the
    tree as README draws it."""
    section = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines()[1:]
            if line.strip() and not line[0].isspace()]  # indented: a description continued


def test_layout_names_what_is_in_the_tree():
    drawn = layout_paths(README.read_text())
    assert len(drawn) > 10
    missing = [path for path in drawn if not (ROOT / path.rstrip("/")).exists()]
    assert not missing, f"README's Layout names paths that do not exist: {missing}"
    modules = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "directclr").glob("*.py"))
    packages = sorted(f"{path.relative_to(ROOT)}/" for path in (ROOT / "directclr").iterdir()
                      if (path / "__init__.py").exists())
    unlisted = [name for name in modules + packages if name not in drawn
                and name != "directclr/__main__.py"]
    assert not unlisted, f"README's Layout leaves out: {unlisted}"
