"""The `upcycle` command: one tree of sub-commands, each a plain function whose signature is its command line."""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import warnings

from upcycle.errors import UserError

log = logging.getLogger(__name__)


def _commands() -> dict:
    """The command tree: a group per method, plus the commands that are not one method's. Building it imports only
    the command modules and their torch-free configs, so `--help` answers at once."""
    from upcycle.data import commands as data
    from upcycle.introvert import commands as introvert
    from upcycle.masks import commands as masks
    from upcycle.models import commands as models
    from upcycle.moe import commands as moe
    from upcycle.serving import commands as serving

    return {
        "introvert": {"_help": "Introvert experts (MoIN): a LoRA expert per document cluster, a sequence router.",
                      "cluster": introvert.cluster, "train-experts": introvert.train_experts,
                      "train-baselines": introvert.train_baselines, "evaluate": introvert.evaluate,
                      "add-data": introvert.add_data,
                      "ablate": introvert.ablate, "report": introvert.report, "generate": introvert.generate},
        "moe": {"_help": "Sparse mixtures of experts (Flan-MoE): upcycle, train, export, inspect, experiment.",
                "upcycle": moe.moe_upcycle, "train": moe.moe_train, "export-mixtral": moe.moe_export_mixtral,
                "inspect": moe.moe_inspect, "experiment": moe.moe_experiment},
        "masks": {"_help": "Experts as learned masks (MoM): train, analyze, export, generate, sweep.",
                  "train": masks.train, "analyze": masks.analyze, "export": masks.export,
                  "generate": masks.generate, "sweep": masks.sweep},
        "demo": introvert.demo,
        "serve": serving.serve,
        "pretrain": models.pretrain,
        "make-corpus": data.make_corpus,
    }


# Names before the command tree; they still work for one release, hidden from --help.
_ALIASES = {
    "cluster": ("introvert", "cluster"), "train-experts": ("introvert", "train-experts"),
    "train-baselines": ("introvert", "train-baselines"), "evaluate": ("introvert", "evaluate"),
    "ablate": ("introvert", "ablate"), "report": ("introvert", "report"), "generate": ("introvert", "generate"),
    "moe-upcycle": ("moe", "upcycle"), "moe-train": ("moe", "train"), "moe-export-mixtral": ("moe", "export-mixtral"),
    "moe-inspect": ("moe", "inspect"), "moe-experiment": ("moe", "experiment"),
}


def _resolve_alias(argv: list[str]) -> list[str]:
    """`argv` with an old command name (the first word that is not an option) spelled as its place in the tree."""
    for i, word in enumerate(argv):
        if word.startswith("-"):
            continue
        if i > 0 and argv[i - 1] == "--config":
            continue
        if word in _ALIASES:
            path = _ALIASES[word]
            log.warning("`upcycle %s` is now `upcycle %s`; the old name goes in the next release", word, " ".join(path))
            return [*argv[:i], *path, *argv[i + 1:]]
        return argv
    return argv


def _on_path(tree: dict, argv: list[str]) -> dict:
    """`tree` with every command off the path that `argv` names replaced by a stub with the same help line.

    jsonargparse builds a parser for every command it is given, reading each config's field docstrings, which is
    most of the time `upcycle --help` takes. Only the named command can run, so the others need only their names and
    help lines. A level where `argv` names no command is kept whole unless --help is asked (a YAML --config may
    name the command there).
    """
    words = [(i, w) for i, w in enumerate(argv) if not w.startswith("-") and (i == 0 or argv[i - 1] != "--config")]
    position, chosen = words[0] if words and words[0][1] in tree else (None, None)
    if chosen is None and not {"-h", "--help"} & set(argv):
        return tree
    pruned = {}
    for name, entry in tree.items():
        if name == "_help":
            pruned[name] = entry
        elif name == chosen:
            pruned[name] = _on_path(entry, argv[position + 1:]) if isinstance(entry, dict) else entry
        else:
            pruned[name] = _stub(entry)
    return pruned


def _stub(entry):
    """A command (or group) that takes nothing and has the same help line as `entry`."""
    if isinstance(entry, dict):
        return {name: sub if name == "_help" else _stub(sub) for name, sub in entry.items()}

    def stub() -> None:
        pass

    stub.__doc__ = (entry.__doc__ or "").strip().split("\n\n")[0]
    stub.__name__ = stub.__qualname__ = entry.__name__
    return stub


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn UserError / Ctrl-C into one line and a non-zero exit code."""
    from jsonargparse import auto_cli, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # config fields' docstrings are their --help
    logging.basicConfig(level=os.environ.get("UPCYCLE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Our own rich bars show progress of long work; per-file "Loading weights" bars from HF are noise here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Deprecation notices from inside transformers/peft are for their developers, not for our users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    argv = _resolve_alias(sys.argv[1:] if argv is None else list(argv))
    try:
        auto_cli(_on_path(_commands(), argv), args=argv, as_positional=True)
    except UserError as error:
        print(f"upcycle: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("upcycle: interrupted; finished work is saved, rerun the same command to continue", file=sys.stderr)
        return 130
    except Exception as error:
        message = _environment_failure(error)
        if message is None:
            raise  # not the machine's fault: a bug, keep its traceback
        print(f"upcycle: error: {message}", file=sys.stderr)
        return 2
    return 0


# Failures of the machine rather than of upcycle or its input: every write is atomic, so after one of these the run
# on disk is still the previous complete state, and one line saying what to fix is all the user needs.
_ENVIRONMENT_ERRORS = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space (quota exceeded)",
                       errno.EFBIG: "free some disk space or raise the file size limit",
                       errno.EROFS: "the file system is read-only; use a writable directory",
                       errno.EACCES: "check the permissions", errno.EPERM: "check the permissions"}
# Libraries written in Rust report the OS error inside their own exception: safetensors raises
# SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)") for a full disk.
_WRAPPED_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _environment_failure(error: Exception) -> str | None:
    """One line for a full disk, a read-only file system or missing permissions (raised directly or wrapped by a
    library); None for anything else."""
    if isinstance(error, OSError):
        code, reason, filename = error.errno, error.strerror, error.filename
    elif match := _WRAPPED_OS_ERROR.search(str(error)):
        code, filename = int(match.group(1)), None
        reason = os.strerror(code)
    else:
        return None
    if code not in _ENVIRONMENT_ERRORS:
        return None
    where = f": {filename}" if filename else ""
    return f"{reason}{where}; {_ENVIRONMENT_ERRORS[code]}, then rerun the same command (finished work is saved)"


if __name__ == "__main__":
    sys.exit(main())
