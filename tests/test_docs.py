"""Docs that cannot drift from the code: every documented command parses with its script's real argument
parser, every relative link and image resolves (anchors included), and the ONNX example in deploy.md is the
file the tests run."""
import re
import shlex
from pathlib import Path

import pytest

import export_draem
import test_draem
from helpers import ROOT
import train_draem

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {"train_draem.py": train_draem.get_args_parser, "test_draem.py": test_draem.get_args_parser,
           "export_draem.py": export_draem.get_args_parser}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SHELL_ENDS = {"&&", "||", "|", ";", ">", ">>", "2>&1"}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, script, arguments) for every line of a shell block that runs one of the scripts."""
    found = []
    for page in PAGES:
        for language, body in FENCE.findall(page.read_text()):
            if language not in ("bash", "sh", "shell"):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                tokens = shlex.split(line, comments=True)
                for i, token in enumerate(tokens):
                    script = Path(token).name
                    if script in PARSERS:
                        args = tokens[i + 1:]
                        end = next((j for j, t in enumerate(args) if t in SHELL_ENDS), len(args))
                        found.append((page.name, script, args[:end]))
    return found


def test_every_documented_command_parses():
    commands = documented_commands()
    assert len(commands) >= 25 and {s for _, s, _ in commands} == set(PARSERS)
    for page, script, args in commands:
        parser = PARSERS[script]()
        parser.allow_abbrev = False  # a documented flag is spelt out: --epoch must not pass as --epochs
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{page}: {script} {' '.join(args)} does not parse (see the argparse message above)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_every_relative_link_and_image_resolves():
    checked = 0
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.exists(), f"{page.name}: {target} does not exist"
            if anchor and resolved.suffix == ".md":
                assert anchor in anchors(resolved), f"{page.name}: {target}: no heading with that anchor"
            checked += 1
    assert checked >= 30


def test_deploy_page_shows_the_example_that_the_tests_run():
    examples = [(ROOT / "examples" / name).read_text()
                for name in ("onnx_inference.py", "openvino_inference.py", "inspection.py")]
    blocks = [body for language, body in FENCE.findall((ROOT / "docs" / "deploy.md").read_text()) if language == "python"]
    assert blocks == examples


def test_readme_is_one_screen_and_the_docs_tell_no_development_story():
    assert len((ROOT / "README.md").read_text()) <= 8000
    story = re.compile(r"final code|previous code|this session|no GPU was available|the issue|has not been run yet|"
                       r"our CI|sessions so far|was developed|rerun with", re.I)
    for path in [*PAGES, *sorted((ROOT / "benchmarks").iterdir())]:
        if path.is_file():
            hits = story.findall(path.read_text())
            assert not hits, f"{path.name}: {hits}"


def test_no_page_points_readers_at_a_folder_they_do_not_have():
    """The development machines' data folder (`../shared`) is for the tests; readers get download and
    preparation commands instead (data.md)."""
    for page in PAGES:
        assert "../shared" not in page.read_text(), page.name
    assert "scripts/prepare_mtd.py" in (ROOT / "docs" / "data.md").read_text()


def inline_commands(page: Path, script: str) -> list[list[str]]:
    """The arguments of every `python SCRIPT ...` in inline code (which may wrap across lines) on a page."""
    spans = re.findall(r"`python " + re.escape(script) + r"([^`]*)`", FENCE.sub("", page.read_text()))
    return [shlex.split(" ".join(span.split())) for span in spans]


def test_the_commands_a_reader_copies_do_what_the_text_around_them_says():
    own_part_cpu = [args for page, script, args in documented_commands()
                    if page == "own-part.md" and script == "train_draem.py" and "--device" in args]
    assert own_part_cpu, "own-part.md's CPU command is gone"
    for args in own_part_cpu:  # the text quotes the 128 px runs' times
        assert train_draem.get_args_parser().parse_args(args).image_size == (128, 128), args
    autos = [args for page in PAGES for args in inline_commands(page, "export_draem.py") if "auto" in args]
    autos += [args for _, script, args in documented_commands() if script == "export_draem.py" and "auto" in args]
    assert autos
    for args in autos:  # with the default ONNX format bf16 is never tried
        parsed = export_draem.get_args_parser().parse_args(args)
        assert parsed.precision == "auto" and parsed.format == "openvino" and parsed.out and parsed.check, args
    readme = (ROOT / "README.md").read_text()
    assert "https://arxiv.org/abs/2108.07610" in readme and "https://github.com/VitjanZ/DRAEM" in readme
    assert "--amp off" in (ROOT / "docs" / "reproducing-mvtec.md").read_text()


def test_the_glossary_explains_every_term_it_is_linked_for():
    glossary = (ROOT / "docs" / "faq.md").read_text().split("## Glossary", 1)[1]
    for term in ("DTD", "AUPRO", "VNNI", "AMX", "QDQ", "NNCF", "Clopper-Pearson", "bf16"):
        assert f"- **{term}" in glossary, term


# Shared flags whose defaults differ on purpose: in scoring, "what the checkpoint records" (None) rather than a
# training setting's default; fp32 (--amp off) so that metrics do not depend on the precision a run trained in;
# --out is a results folder for scoring and the exported file for export.
OWN_DEFAULTS = {"--image_size", "--obj_id", "--batch_size", "--amp", "--out"}


def test_flags_the_scripts_share_are_spelled_parsed_and_defaulted_alike():
    seen = {}
    for script, make in PARSERS.items():
        for action in make()._actions:
            for flag in action.option_strings:
                seen.setdefault(flag, []).append((script, action))
    shared = {flag: found for flag, found in seen.items() if len(found) > 1 and flag not in ("-h", "--help")}
    assert {"--device", "--debug", "--bit_depth", "--workers", "--batch_size"} <= set(shared)
    for flag, found in shared.items():
        assert len({a.type for _, a in found}) == 1, flag
        if flag not in OWN_DEFAULTS:
            assert len({repr(a.default) for _, a in found}) == 1, (flag, [(s, a.default) for s, a in found])
