"""Write docs/cli.md, the command-line reference, from the Typer app itself (gi_deploy.cli:app): each
command's usage, help and options as ``--help`` knows them, so the reference cannot drift from the code.

    python scripts/cli_reference.py            # (re)write docs/cli.md
    python scripts/cli_reference.py --check    # exit 1 when docs/cli.md is not what the app says (CI)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import typer
import typer.main

from gi_deploy.cli import app

PROG = "gi-deploy"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

HEADER = f"""# Command-line reference

Generated from the Typer app by `python scripts/cli_reference.py` (do not edit by hand; the README's test
command runs it with `--check` and fails when this page is stale). `{PROG} COMMAND --help` prints the same.
"""

# Markdown would read these as emphasis, links or escapes outside a code span; "<" starts HTML
_SPECIAL = re.compile(r"([\\*_\[\]])")


def _md(text: str) -> str:
    """Help text as Markdown: code spans (`...`) kept as they are, everything else escaped, so a glob
    such as 'scans/**/*.jpg' or a type such as <path> shows as written."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else _SPECIAL.sub(r"\\\1", p).replace("<", "&lt;") for p in parts)


def _paragraphs(text: str) -> str:
    return "\n\n".join(_md(p.strip()) for p in text.split("\n\n") if p.strip())


def _command_section(group: typer.core.TyperGroup, ctx: typer.Context, name: str) -> str:
    command = group.get_command(ctx, name)
    sub = typer.Context(command, info_name=name, parent=ctx)
    usage = " ".join([PROG, name, *command.collect_usage_pieces(sub)])
    lines = [f"## `{PROG} {name}`", "", _paragraphs(command.help or ""), "", "```", usage, "```", ""]
    params = [p for p in command.get_params(sub) if not getattr(p, "hidden", False)]
    for kind, title in (("argument", "Arguments"), ("option", "Options")):
        rows = [p.get_help_record(sub) for p in params if p.param_type_name == kind]
        rows = [r for r in rows if r]
        if not rows:
            continue
        lines += [f"**{title}**", ""]
        # "  [default: x]" (typer's) and "; " between --x and --no-x are kept as typer writes them
        lines += [f"- `{flags}`: {_md(' '.join(text.split()))}" for flags, text in rows]
        lines.append("")
    return "\n".join(lines)


def render() -> str:
    """The whole reference: the group's own help and options, then one section per command."""
    group = typer.main.get_command(app)
    ctx = typer.Context(group, info_name=PROG)
    sections = [HEADER, _paragraphs(group.help or ""), ""]
    options = [p.get_help_record(ctx) for p in group.get_params(ctx)]
    sections += ["**Options of every command** (before the command's name)", ""]
    sections += [f"- `{flags}`: {_md(text)}" for flags, text in filter(None, options)]
    sections += ["", "**Commands**", ""]
    names = group.list_commands(ctx)
    sections += [f"- [`{n}`](#{PROG}-{n}): {_md(_first_sentence(group.get_command(ctx, n).help or ''))}" for n in names]
    sections.append("")
    sections += [_command_section(group, ctx, n) for n in names]
    return "\n".join(sections).rstrip() + "\n"


def _first_sentence(text: str) -> str:
    return text.split("\n\n")[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from the app")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the reference file (docs/cli.md)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(
                f"{args.out} is stale (the CLI changed): run `python scripts/cli_reference.py` and commit it",
                file=sys.stderr,
            )
            return 1
        print(f"{args.out} matches the CLI")
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
