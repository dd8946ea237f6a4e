"""Every link into a heading of the documents (`[text](results.md#heading)`, `[text](#heading)`)
names a heading that exists: headings get renamed as results change, and GitHub then drops the
reader at the top of a long page without a word."""
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {github_anchor(h) for h in re.findall(r"^#+ (.*)$", doc.read_text(), flags=re.M)}


def test_github_anchor_matches_hand_made_examples():
    assert github_anchor("DSP learning without dropout (the twenty-fifth session)") == \
        "dsp-learning-without-dropout-the-twenty-fifth-session"
    assert github_anchor("Kwon's scales on today's default, and what the pruning data can tell") == \
        "kwons-scales-on-todays-default-and-what-the-pruning-data-can-tell"
    assert github_anchor("Language models (`--task causal-lm`)") == "language-models---task-causal-lm"


def test_every_link_to_a_heading_finds_it():
    broken = []
    for doc in DOCS:
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?#([\w-]+)\)", doc.read_text()):
            linked = (doc.parent / target).resolve() if target else doc
            if anchor not in anchors(linked):
                broken.append(f"{doc.relative_to(ROOT)} -> {target or doc.name}#{anchor}")
    assert not broken, "links to missing headings:\n" + "\n".join(broken)


def test_every_method_is_named_in_its_help_and_docs():
    """Adding a method to config.METHODS leaves three things to do by hand (docs/architecture.md):
    the `--method` help, its entry in docs/usage.md and, for a scored one, its section of
    docs/methods.md. A method missing from any of them is named here."""
    from headprune.config import METHODS, SCORED, PruneConfig
    import dataclasses
    method_help = next(f for f in dataclasses.fields(PruneConfig) if f.name == "method").metadata["help"]
    usage, methods = (ROOT / "docs" / "usage.md").read_text(), (ROOT / "docs" / "methods.md").read_text()
    missing = [f"--method help: {m}" for m in METHODS if not re.search(rf"\b{m} \(|or {m}\.", method_help)]
    missing += [f"docs/usage.md: --method {m}" for m in METHODS if f"--method {m}" not in usage]
    missing += [f"docs/methods.md: ## {m}:" for m in SCORED if not re.search(rf"^## {m}:", methods, flags=re.M)]
    assert not missing, "\n".join(missing)
