"""Every ``seghirescam <command> --flag`` that README.md and docs/*.md show exists in the real parser.

The command lines are taken from fenced code blocks (with ``\\`` continuations joined, ``# comments`` dropped)
and from inline code spans; each command must be a sub-command of ``build_parser()`` and each ``--flag`` one of
that sub-command's options (with a literal value among the option's ``choices`` where it has any). A renamed or
removed option then fails here instead of in a reader's shell.
"""

import argparse
import glob
import os
import re

import pytest

from SegHiResCAMLib.cli.app import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
COMMAND = re.compile(r"(?:\bseghirescam|SegHiResCAMLib\.cli)\s+([a-z][a-z-]*)\b(.*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def command_lines(text):
    """``(line number, command, rest of the line)`` for every command line in fenced blocks and code spans."""
    found = []
    fenced = False
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i]
        i += 1
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            while line.rstrip().endswith("\\") and i < len(lines):
                line = line.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
            line = re.split(r"\s#\s", line, maxsplit=1)[0]
            spans = [line]
        else:
            spans = re.findall(r"`([^`]+)`", line)
        for span in spans:
            for match in COMMAND.finditer(span):
                found.append((number, match.group(1), match.group(2)))
    return found


def subparsers():
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("build_parser() has no sub-commands")


def problems(text, name="text"):
    """One line per command that does not exist, flag that the command lacks, or value outside its choices."""
    commands = subparsers()
    out = []
    for number, command, rest in command_lines(text):
        where = "%s:%d: seghirescam %s" % (name, number, command)
        if command not in commands:
            out.append("%s: no such command (commands: %s)" % (where, ", ".join(sorted(commands))))
            continue
        options = {}
        for action in commands[command]._actions:
            for option in action.option_strings:
                options[option] = action
        tokens = rest.split()
        for k, token in enumerate(tokens):
            flag = token.split("=", 1)[0]
            if not FLAG.fullmatch(flag):
                continue
            if flag not in options:
                out.append("%s: %s is not an option of this command" % (where, flag))
                continue
            choices = options[flag].choices
            value = token.split("=", 1)[1] if "=" in token else (tokens[k + 1] if k + 1 < len(tokens) else None)
            if choices and value and not value.startswith("-") and re.fullmatch(r"[\w.-]+", value) \
                    and value not in choices:
                out.append("%s: %s %s is not one of %s" % (where, flag, value, sorted(choices)))
    return out


@pytest.mark.parametrize("path", DOCS, ids=[os.path.relpath(p, ROOT) for p in DOCS])
def test_documented_command_lines_use_real_commands_and_options(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = problems(text, os.path.relpath(path, ROOT))
    assert not found, "\n".join(found)


def test_the_readme_shows_the_commands():
    """The extraction finds the README's command lines (an extractor that finds nothing would pass anything)."""
    with open(DOCS[0], encoding="utf-8") as f:
        found = command_lines(f.read())
    assert len(found) >= 20
    assert {"explain", "predict", "layers", "evaluate", "sa-score", "cohort", "demo"} <= {c for _, c, _ in found}


def test_a_stale_flag_a_wrong_command_and_a_wrong_choice_are_reported():
    text = "\n".join([
        "```",
        "seghirescam explain --model hd-bet --image t1.nii.gz \\",
        "        --out heat.nii.gz --no-such-flag   # --comment-flag is ignored",
        "seghirescam explane --model hd-bet",
        "```",
        "Prose with `seghirescam predict --tta` and `seghirescam explain --blend triangular`.",
        "Outside code: seghirescam explain --not-checked.",
    ])
    found = problems(text)
    assert len(found) == 3, found
    assert "text:2: seghirescam explain: --no-such-flag is not an option" in found[0]
    assert "text:4: seghirescam explane: no such command" in found[1]
    assert "--blend triangular is not one of" in found[2]
