"""``stllm fiftyone install``: put the plugin where FiftyOne finds it, and check what the App needs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path


def plugin_folder() -> Path:
    """The FiftyOne plugin's folder in this installation (found, not imported)."""
    spec = importlib.util.find_spec("fiftyone_stllm")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "the fiftyone_stllm package is not installed: pip install 'stllm-labeling[fiftyone]'"
        )
    return Path(spec.origin).resolve().parent


def install_fiftyone_plugin(plugins_dir: str | os.PathLike | None = None) -> Path:
    """Link this project's FiftyOne plugin into FiftyOne's plugins folder; returns the link."""
    if plugins_dir is None:
        plugins_dir = os.environ.get("FIFTYONE_PLUGINS_DIR")
    if plugins_dir is None:
        import fiftyone as fo

        plugins_dir = fo.config.plugins_dir
    if not plugins_dir:
        raise SystemExit("no FiftyOne plugins folder: set FIFTYONE_PLUGINS_DIR or pass --dir")
    target = Path(plugins_dir) / "stllm-labeling"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(plugin_folder(), target_is_directory=True)
    return target


def missing_video_tools() -> list[str]:
    """Which of ffmpeg and ffprobe (the FiftyOne App needs both to show video datasets) are not on PATH."""
    return [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]


def cmd_fiftyone(args) -> int:
    link = install_fiftyone_plugin(args.dir)
    print(f"installed the plugin at {link}; in the App, press '`' and search 'ST-LLM'")
    missing = missing_video_tools()
    if missing:
        print(
            f"warning: {' and '.join(missing)} not found. The FiftyOne App needs ffmpeg and ffprobe to show "
            "video datasets ('You must have ffmpeg installed...'). Install them: on Debian/Ubuntu "
            "'sudo apt-get install ffmpeg', on macOS 'brew install ffmpeg', with conda "
            "'conda install -c conda-forge ffmpeg'. The workers themselves do not need them.",
            file=sys.stderr,
        )
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("fiftyone", help="FiftyOne integration")
    fsub = p.add_subparsers(dest="fiftyone_command", required=True, metavar="ACTION")
    f = fsub.add_parser(
        "install",
        help="put the plugin where FiftyOne finds it (a link into its plugins folder); checks for ffmpeg",
    )
    f.add_argument("--dir", default=None, help="plugins folder (default: FiftyOne's plugins_dir)")
    p.set_defaults(func=cmd_fiftyone)
