"""The documentation resolves inside a clone of the repository (issue 15).

- Every relative Markdown link (and image) in README.md, BENCHMARKS.md and docs/*.md names a file of the
  repository that .gitignore does not exclude, and an anchor, if any, names a heading of the target.
- Every repository path written as a code span (`benchmarks/gpu.sh`, `../x/`) exists, or is an output location
  that .gitignore excludes.
- Every code reference written `model.py: Name` or `model.py: Class.member` names a function, class or constant
  defined in that file (read with ast, nothing is imported).
"""
import ast
import fnmatch
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.I)
CODE_REFERENCE = re.compile(r"^([\w./-]+\.py):\s*(.*)$")
NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)?$")
PATH_SPAN = re.compile(r"^[\w.-]+(/[\w.-]+)*/?$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def prose(text: str) -> str:
    """The text without fenced code blocks (their lines become empty, so line numbers stay)."""
    out, fence = [], None
    for line in text.splitlines():
        marker = re.match(r"^\s{0,3}(`{3,}|~{3,})", line)
        if fence is None and marker:
            fence = marker.group(1)[0] * len(marker.group(1))
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def code_spans(text: str) -> list:
    return [m.group(2).strip() for m in CODE_SPAN.finditer(prose(text))]


def links(text: str) -> list:
    body = CODE_SPAN.sub("", prose(text))  # a link written inside a code span is not a link
    return [m.group(1) for m in LINK.finditer(body)] + REFERENCE_DEFINITION.findall(body)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set:
    found, seen = set(), {}
    for line in prose(text).splitlines():
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found | set(HTML_ANCHOR.findall(text))


def gitignore_patterns() -> list:
    file = ROOT / ".gitignore"
    lines = file.read_text(encoding="utf-8").splitlines() if file.is_file() else []
    return [p.strip() for p in lines if p.strip() and not p.lstrip().startswith(("#", "!"))]


def ignored(relpath: str) -> bool:
    """Whether .gitignore excludes this repository path or a folder above it (simple patterns only)."""
    parts = relpath.strip("/").split("/")
    for pattern in gitignore_patterns():
        anchored, body = pattern.startswith("/") or "/" in pattern.rstrip("/"), pattern.strip("/")
        for i in range(1, len(parts) + 1):
            candidate = "/".join(parts[:i])
            if pattern.endswith("/") and i == len(parts) and not (ROOT / candidate).is_dir() \
                    and not relpath.endswith("/"):
                continue  # a folder-only pattern on what may be a file
            if fnmatch.fnmatch(candidate if anchored else parts[i - 1], body):
                return True
    return False


def inside(path: Path) -> str | None:
    """The repository-relative form of path, or None when it lies outside the repository."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return None


def link_problems(doc: Path, text: str = None) -> list:
    problems = []
    text = doc.read_text(encoding="utf-8") if text is None else text
    for target in links(text):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # an external address: not this test's business
        path_part, _, anchor = unquote(target).partition("#")
        dest = (doc.parent / path_part) if path_part else doc
        where = inside(dest)
        if where is None:
            problems.append(f"{rel(doc)}: link {target!r} leaves the repository")
        elif not dest.exists():
            problems.append(f"{rel(doc)}: link {target!r}: no such file {where}")
        elif ignored(where):
            problems.append(f"{rel(doc)}: link {target!r}: {where} is excluded by .gitignore, absent from a clone")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(
                text if dest == doc else dest.read_text(encoding="utf-8")):
            problems.append(f"{rel(doc)}: link {target!r}: no heading #{anchor} in {where}")
    return problems


def path_problems(doc: Path, text: str = None) -> list:
    """Code spans that are repository paths: the first part is '.', '..' or an entry of the repository root."""
    problems = []
    top = {p.name for p in ROOT.iterdir()}
    for span in code_spans(doc.read_text(encoding="utf-8") if text is None else text):
        if "/" not in span or not PATH_SPAN.match(span):
            continue
        first = span.split("/")[0]
        if first in (".", ".."):
            dest = doc.parent / span
        elif first in top:
            dest = ROOT / span
        else:
            continue
        where = inside(dest)
        if where is None:
            problems.append(f"{rel(doc)}: path `{span}` is outside the repository")
        elif not dest.exists() and not ignored(where + ("/" if span.endswith("/") else "")) \
                and not ignored(where + "/"):
            problems.append(f"{rel(doc)}: path `{span}` does not exist in the repository")
    return problems


def defined_names(source: Path) -> dict:
    """{name: member names} for everything a module defines at its top level (inside if/try blocks too):
    functions, classes (with their methods, nested classes and class attributes) and assigned constants."""
    names = {}

    def targets(node):
        if isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, (ast.Tuple, ast.List)):
            for element in node.elts:
                yield from targets(element)

    def members(cls):
        out = set()
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
            elif isinstance(node, ast.Assign):
                out.update(n for t in node.targets for n in targets(t))
            elif isinstance(node, ast.AnnAssign):
                out.update(targets(node.target))
        return out

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names[node.name] = set()
            elif isinstance(node, ast.ClassDef):
                names[node.name] = members(node)
            elif isinstance(node, ast.Assign):
                names.update({n: set() for t in node.targets for n in targets(t)})
            elif isinstance(node, ast.AnnAssign):
                names.update({n: set() for n in targets(node.target)})
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                              *[h.body for h in getattr(node, "handlers", [])]):
                    visit(block)

    visit(ast.parse(source.read_text(encoding="utf-8"), filename=str(source)).body)
    return names


def reference_problems(doc: Path, text: str = None) -> list:
    problems, modules = [], {}
    for span in code_spans(doc.read_text(encoding="utf-8") if text is None else text):
        m = CODE_REFERENCE.match(span)
        if not m:
            continue
        file, name = m.group(1), m.group(2).strip()
        source = ROOT / file
        if inside(source) is None or not source.is_file():
            problems.append(f"{rel(doc)}: `{span}`: no file {file} in the repository")
            continue
        if not NAME.match(name):
            problems.append(f"{rel(doc)}: `{span}`: write one name, `{file}: Name` or `{file}: Class.member`")
            continue
        if file not in modules:
            modules[file] = defined_names(source)
        defined = modules[file]
        outer, _, member = name.partition(".")
        if outer not in defined:
            problems.append(f"{rel(doc)}: `{span}`: {file} defines no {outer}")
        elif member and member not in defined[outer]:
            problems.append(f"{rel(doc)}: `{span}`: {outer} in {file} has no member {member}")
    return problems


def doc_param(path: Path):
    return pytest.param(path, id=rel(path))


def test_docs_folder_holds_the_documents():
    assert {"models.md", "kernels.md"} <= {p.name for p in DOCS}


@pytest.mark.parametrize("doc", [doc_param(ROOT / "README.md"), doc_param(ROOT / "BENCHMARKS.md")]
                         + [doc_param(p) for p in DOCS])
def test_relative_links_resolve(doc):
    assert link_problems(doc) == []


@pytest.mark.parametrize("doc", [doc_param(ROOT / "README.md"), doc_param(ROOT / "BENCHMARKS.md")]
                         + [doc_param(p) for p in DOCS])
def test_repository_paths_in_code_spans_exist(doc):
    assert path_problems(doc) == []


@pytest.mark.parametrize("doc", [doc_param(ROOT / "README.md"), doc_param(ROOT / "BENCHMARKS.md")]
                         + [doc_param(p) for p in DOCS])
def test_code_references_name_definitions(doc):
    assert reference_problems(doc) == []


def test_the_checks_catch_what_they_are_for():
    """The checkers themselves, on a hand-made document: each kind of fault is reported, good ones are not."""
    doc = ROOT / "docs" / "models.md"
    text = "\n".join([
        "# Title", "## Two words", "",
        "[ok](kernels.md) [ok anchor](#two-words) [ext](https://example.org/x) `[not a link](nowhere.md)`",
        "[bad](missing.md) [out](../../elsewhere.md) [bad anchor](kernels.md#no-such-heading)",
        "`model.py: KVCache.reset` `moe_kernels.py: run` `model.py: NoSuchThing` `model.py: KVCache.nothing`",
        "`benchmarks/gpu.sh` `benchmarks/gpu-out/` `benchmarks/nothing.py` `../../shared/spec/` `h/2`",
        "```", "[in a fence](missing-too.md)", "```",
    ])
    assert [p.split(": ", 1)[1] for p in link_problems(doc, text)] == [
        "link 'missing.md': no such file docs/missing.md",
        "link '../../elsewhere.md' leaves the repository",
        "link 'kernels.md#no-such-heading': no heading #no-such-heading in docs/kernels.md"]
    assert [p.split(": ", 1)[1] for p in reference_problems(doc, text)] == [
        "`model.py: NoSuchThing`: model.py defines no NoSuchThing",
        "`model.py: KVCache.nothing`: KVCache in model.py has no member nothing"]
    assert [p.split(": ", 1)[1] for p in path_problems(doc, text)] == [
        "path `benchmarks/nothing.py` does not exist in the repository",
        "path `../../shared/spec/` is outside the repository"]


def definition_length(file: str, name: str) -> int:
    """Source lines of a top-level function or class, or of one member of a class."""
    outer, _, member = name.partition(".")
    for node in ast.parse((ROOT / file).read_text(encoding="utf-8")).body:
        if getattr(node, "name", None) == outer:
            if member:
                node = next(n for n in node.body if getattr(n, "name", None) == member)
            return node.end_lineno - node.lineno + 1
    raise LookupError(f"{file} defines no {name}")


GUIDE_ROW = re.compile(r"^\|.*\|\s*((?:`[\w./-]+\.py:\s*[\w.]+`,?\s*)+)\|\s*([\d,\s]+)\|\s*$")


def test_reading_guide_gives_each_definition_its_length():
    """docs/method.md's tables give the length of every definition they point to: they must stay true."""
    problems, checked = [], 0
    for line in (ROOT / "docs" / "method.md").read_text(encoding="utf-8").splitlines():
        m = GUIDE_ROW.match(line)
        if not m:
            continue
        refs = re.findall(r"`([\w./-]+\.py):\s*([\w.]+)`", m.group(1))
        lengths = [int(n) for n in m.group(2).split(",")]
        assert len(refs) == len(lengths), f"docs/method.md: one length per reference: {line}"
        for (file, name), n in zip(refs, lengths):
            checked += 1
            actual = definition_length(file, name)
            if actual != n:
                problems.append(f"docs/method.md: `{file}: {name}` is {actual} lines long, the guide says {n}")
    assert checked >= 40 and problems == []
