"""pip's configuration as uv's environment: `eval "$(python3 tools/uv_env.py)"` before `uv pip install`.

uv reads no pip.conf and no PIP_* variables, so a machine whose pip finds its wheels through them (local find-links,
mirror indexes, a global constraints file, a private CA) would send uv to PyPI instead. This prints one
`export UV_...=...` line per setting `pip config list` shows (the environment's over the files'), and asks uv to
weigh every index alike, as pip does. Standard library only: it runs before anything is installed."""

import shlex
import subprocess
import sys

UV_NAME = {"find-links": "UV_FIND_LINKS", "extra-index-url": "UV_EXTRA_INDEX_URL", "index-url": "UV_INDEX_URL",
           "constraint": "UV_CONSTRAINT", "cert": "SSL_CERT_FILE"}
PRIORITY = {"global": 0, "user": 1, "site": 2, ":env:": 3}  # pip's order: later ones win


def pip_settings(listing: str) -> dict[str, str]:
    """`pip config list` lines (`global.find-links='/opt/wheels'`, `:env:.cert='...'`) -> {name: value}"""
    found: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        scope, _, name = key.rpartition(".")
        if not sep or name not in UV_NAME:
            continue
        rank = PRIORITY.get(scope, 0)
        if name not in found or rank >= found[name][0]:
            found[name] = (rank, value.strip().strip("'\""))
    return {name: value for name, (_, value) in found.items()}


def main() -> None:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    settings = pip_settings(listing)
    print("export UV_INDEX_STRATEGY=unsafe-best-match")
    for name, value in settings.items():
        if name in ("find-links", "extra-index-url", "constraint"):  # pip: whitespace-separated lists
            value = ("," if name == "find-links" else " ").join(value.split())  # uv: find-links by commas
        print(f"export {UV_NAME[name]}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
