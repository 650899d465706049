"""The generated artifacts (completions/, man/kmpwm.1) match the CLI, and the CLI documents itself.

The artifacts are produced by ``scripts/generate.py``; when a test here says they are stale,
run ``python scripts/generate.py`` and commit the result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from kmpwm.cli.app import app
from kmpwm.core import exitcodes

ROOT = Path(__file__).resolve().parents[2]
MAN_PAGE = ROOT / "man" / "kmpwm.1"
COMPLETIONS = {
    "bash": ROOT / "completions" / "kmpwm.bash",
    "zsh": ROOT / "completions" / "_kmpwm",
    "fish": ROOT / "completions" / "kmpwm.fish",
}
REGENERATE = "python scripts/generate.py"
TIMEOUT = 120


def _context(command, name, parent=None):
    return command.context_class(command, info_name=name, parent=parent, **command.context_settings)


def _tree():
    """(command, ctx) for the root and every visible subcommand, depth first."""
    root = typer.main.get_command(app)
    out = []

    def walk(command, ctx):
        out.append((command, ctx))
        if hasattr(command, "list_commands"):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, _context(sub, name, ctx))

    walk(root, _context(root, "kmpwm"))
    return out


TREE = _tree()
SUBCOMMANDS = [(command, ctx) for command, ctx in TREE[1:]]
GROUPS = [(command, ctx) for command, ctx in TREE if hasattr(command, "list_commands")]


def _options(command, ctx):
    return [p for p in command.get_params(ctx) if p.param_type_name == "option" and not p.hidden]


def _is_help_option(param, ctx) -> bool:
    return set(param.opts) <= set(ctx.help_option_names)


def _roff_name(name: str) -> str:
    return name.replace("-", "\\-")


# -- (a) the checked-in files are what the generator writes --------------------------------


def test_generated_files_are_up_to_date():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, (
        f"completions/ or man/kmpwm.1 is out of date with the CLI; run `{REGENERATE}` and commit the result.\n"
        f"{proc.stdout}{proc.stderr}"
    )


def test_man_page_has_no_date_or_other_run_dependent_text():
    th = next(line for line in MAN_PAGE.read_text().splitlines() if line.startswith(".TH "))
    from kmpwm import __version__

    assert th == f'.TH KMPWM 1 "" "kmpwm {__version__}" "User Commands"'


# -- (b) the man page renders cleanly ------------------------------------------------------


def test_man_page_renders_without_warnings():
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed")
    proc = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-z", str(MAN_PAGE)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


# -- (c) everything in the command tree is documented and completable ----------------------


def _man_sections() -> dict[str, str]:
    """The man page split at `.SH`/`.SS` headings: {heading: body}."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in MAN_PAGE.read_text().splitlines():
        if line.startswith((".SH ", ".SS ")):
            current = line[4:].strip().strip('"')
            sections[current] = []
        else:
            sections.setdefault(current, []).append(line)
    return {heading: "\n".join(body) for heading, body in sections.items()}


def test_man_page_documents_every_command_and_option():
    sections = _man_sections()
    missing = []
    root, root_ctx = TREE[0]
    for option in _options(root, root_ctx):
        for name in option.opts + option.secondary_opts:
            if f"\\fB{_roff_name(name)}\\fR" not in sections.get("OPTIONS", ""):
                missing.append(f"kmpwm {name}")
    for command, ctx in SUBCOMMANDS:
        heading = _roff_name(ctx.command_path)
        if heading not in sections:
            missing.append(ctx.command_path)
            continue
        for option in _options(command, ctx):
            if _is_help_option(option, ctx):
                continue  # documented once, under OPTIONS
            for name in option.opts + option.secondary_opts:
                if f"\\fB{_roff_name(name)}\\fR" not in sections[heading]:
                    missing.append(f"{ctx.command_path} {name}")
    assert not missing, f"not in man/kmpwm.1 (run `{REGENERATE}`): {', '.join(missing)}"


def test_man_page_has_the_fixed_sections():
    sections = _man_sections()
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "ENVIRONMENT", "FILES", "EXIT STATUS"):
        assert heading in sections, heading
    for variable in ("KMPWM_HOME", "KMPWM_ASSUME", "KMPWM_LOCK_TIMEOUT", "NO_COLOR"):
        assert f"\\fB{variable}\\fR" in sections["ENVIRONMENT"], variable
    for name in ("journal/", "config.toml", "logs/"):
        assert f"\\fI{name}\\fR" in sections["FILES"], name
    codes = {v for k, v in vars(exitcodes).items() if k.isupper() and isinstance(v, int)}
    assert codes >= {0, 1, 2, 65, 69, 70, 74, 75, 77, 78}
    for code in sorted(codes):
        assert f"\\fB{code}\\fR" in sections["EXIT STATUS"], f"exit status {code} is not in man/kmpwm.1"


@pytest.mark.parametrize("shell", sorted(COMPLETIONS))
def test_completion_scripts_call_back_into_kmpwm(shell):
    # Commands, options, workers and task ids are not listed in the scripts: they ask
    # `kmpwm` itself at completion time, so they reach whatever the installed CLI has.
    script = COMPLETIONS[shell].read_text()
    assert f"_KMPWM_COMPLETE=complete_{shell}" in script
    assert "kmpwm" in script.rsplit("_KMPWM_COMPLETE", 1)[1]


# -- (d) every command, option and argument says what it does ------------------------------


def test_every_command_has_help():
    missing = [ctx.command_path for command, ctx in TREE if not (command.help or "").strip()]
    assert not missing, f"commands without help text in kmpwm/cli.py: {', '.join(missing)}"


def test_every_option_has_help():
    missing = [
        f"{ctx.command_path} {'/'.join(option.opts)}"
        for command, ctx in TREE
        for option in _options(command, ctx)
        if not (option.help or "").strip()
    ]
    assert not missing, f"options without help= in kmpwm/cli.py: {', '.join(missing)}"


def test_every_argument_has_help():
    missing = [
        f"{ctx.command_path} {argument.make_metavar(ctx)}"
        for command, ctx in TREE
        for argument in command.get_params(ctx)
        if argument.param_type_name == "argument" and not (getattr(argument, "help", None) or "").strip()
    ]
    assert not missing, f"arguments without help= in kmpwm/cli.py: {', '.join(missing)}"


# -- (e) completion really happens, dynamically --------------------------------------------


@pytest.fixture
def completion_env(tmp_path) -> dict[str, str]:
    """An environment whose `kmpwm` is this checkout, with a fresh private home."""
    home = tmp_path / "kmpwm-home"
    home.mkdir()
    os.chmod(home, 0o700)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "kmpwm"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kmpwm "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_KMPWM_COMPLETE", "_TYPER_COMPLETE", "KMPWM_"))}
    env.update(
        KMPWM_HOME=str(home),
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        NO_COLOR="1",
    )
    return env


BASH_COMPLETE = r"""
source "$1"; shift
spec=$(complete -p kmpwm) || exit 3
func=${spec##*-F }; func=${func%% *}
COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 ))
COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
"$func" kmpwm "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def _bash_complete(env: dict[str, str], *words: str) -> list[str]:
    """What Tab offers in bash after ``words`` (the last one being completed)."""
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", BASH_COMPLETE, "complete", str(COMPLETIONS["bash"]), *words],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


@needs_bash
def test_bash_completes_a_command(completion_env):
    assert _bash_complete(completion_env, "kmpwm", "enq") == ["enqueue"]


@needs_bash
@pytest.mark.parametrize("path", [ctx.command_path for _, ctx in GROUPS])
def test_bash_completes_every_subcommand(completion_env, path):
    group, _ = next((command, ctx) for command, ctx in GROUPS if ctx.command_path == path)
    offered = _bash_complete(completion_env, *path.split(), "")
    expected = {name for name, command in group.commands.items() if not command.hidden}
    assert expected <= set(offered)


@needs_bash
def test_bash_completes_worker_names(completion_env):
    assert "echo" in _bash_complete(completion_env, "kmpwm", "enqueue", "nightly", "ec")


@needs_bash
def test_bash_completes_task_ids_from_the_journal(completion_env):
    subprocess.run(
        [sys.executable, "-m", "kmpwm", "enqueue", "nightly-backup", "echo", "--delay", "1h"],
        env=completion_env,
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert _bash_complete(completion_env, "kmpwm", "cancel", "nightly") == ["nightly-backup"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completes_on_the_first_tab_when_autoloaded(completion_env):
    # compinit registers `_kmpwm` from $fpath; the first Tab runs the file's body. A stand-in
    # `_arguments` records what the completion would offer, outside an interactive shell.
    script = r"""
fpath=("$1" $fpath); autoload -Uz compinit && compinit -D -u
_arguments() { print -r -- "$*" }
words=(kmpwm enq); CURRENT=2
$_comps[kmpwm]
$_comps[kmpwm]
"""
    proc = subprocess.run(
        ["zsh", "-df", "-c", script, "zsh", str(COMPLETIONS["zsh"].parent)],
        env=completion_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    offers = proc.stdout.splitlines()
    assert len(offers) == 2 and all('"enqueue"' in line for line in offers), proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_a_command(completion_env):
    proc = subprocess.run(
        ["fish", "--no-config", "-c", f"source {COMPLETIONS['fish']}; complete -C 'kmpwm enq'"],
        env=completion_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == ["enqueue"]
