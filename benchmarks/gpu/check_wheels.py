"""Check that skinfusion's requirements are met on the H100 / H200 machines: by the carried wheels or by its image.

    python benchmarks/gpu/check_wheels.py .whl          # here: the wheels in .whl/ against h200-packages.txt
    python3 benchmarks/gpu/check_wheels.py --installed  # there (run.sh's env step): the installed versions

Both walk the requirements from ``pyproject.toml``'s dependencies (with the extras they name, e.g.
``jsonargparse[signatures]``) through every ``Requires-Dist`` of what provides them, markers evaluated for
CPython 3.12 on Linux x86_64. With wheels, a requirement is met by a wheel of a matching version or by a package
of the image's list (whose versions cannot be read from here: ``--installed`` checks them there); every wheel
listed in ``wheels.txt`` must be in the folder, no other, one version each. Exits 1 on any problem.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: The H100 / H200 machines' interpreter (KINDS.md: one image, Python 3.12.3 on x86-64 Linux).
TARGET = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def listed(path: Path) -> list[str]:
    """The non-comment lines of a list file (``name`` or ``name==version``), comments after ``#`` dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _applies(requirement: Requirement, extras: set[str], environment: dict[str, str] | None) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**(environment or {}), "extra": e}) for e in extras | {""})


def wheel_metadata(path: Path):
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(archive.read(name).decode("utf-8"))


def walk(provide, environment: dict[str, str] | None) -> list[str]:
    """Follow the project's requirements; ``provide(name)`` gives ``(version or None, requires or None, origin)``.

    Returns:
        One line per problem (empty: every requirement met).
    """
    problems: list[str] = []
    queue = [(r, "pyproject.toml") for r in project_requirements()]
    seen: set[tuple[str, frozenset[str]]] = set()
    while queue:
        requirement, wanted_by = queue.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        version, requires, origin = provide(name)
        if origin is None:
            problems.append(f"missing: {requirement} (wanted by {wanted_by})")
            continue
        if version is not None and requirement.specifier and not requirement.specifier.contains(version, True):
            problems.append(f"version: {name} {version} ({origin}) does not satisfy {requirement} ({wanted_by})")
        for line in requires or []:
            needed = Requirement(line)
            if _applies(needed, set(requirement.extras), environment):
                queue.append((needed, f"{name}{sorted(requirement.extras) or ''}"))
    return problems


def check_wheels(folder: Path) -> list[str]:
    image = {canonicalize_name(n) for n in listed(HERE / "h200-packages.txt")}
    wheels: dict[str, tuple[str, list[str], str]] = {}
    problems = []
    for path in sorted(folder.glob("*.whl")):
        meta = wheel_metadata(path)
        name = canonicalize_name(meta["Name"])
        if name in wheels:
            problems.append(f"two versions of {name}: {wheels[name][2]} and {path.name} (keep one)")
        wheels[name] = (meta["Version"], meta.get_all("Requires-Dist") or [], path.name)
    pinned = {canonicalize_name(line.split("==")[0]): line.split("==")[1] for line in listed(HERE / "wheels.txt")}
    for name, version in pinned.items():
        if name not in wheels:
            problems.append(f"not downloaded: {name}=={version} (run benchmarks/gpu/fetch_wheels.sh)")
        elif wheels[name][0] != version:
            problems.append(f"{wheels[name][2]} is not the pinned {name}=={version}")
    problems += [f"not in wheels.txt: {wheels[n][2]}" for n in wheels if n not in pinned]
    problems += [f"carried although the image has it: {wheels[n][2]}" for n in wheels if n in image]

    def provide(name: str):
        if name in wheels:
            version, requires, filename = wheels[name]
            return version, requires, filename
        if name in image:
            return None, None, "image"
        return None, None, None

    problems += walk(provide, TARGET)
    # Every wheel's own requirements too, whether or not the walk above reached it.
    for _, requires, filename in wheels.values():
        for line in requires:
            needed = Requirement(line)
            if _applies(needed, set(), TARGET) and provide(canonicalize_name(needed.name))[2] is None:
                problems.append(f"missing: {needed} (wanted by {filename})")
    return sorted(set(problems))


def check_installed() -> list[str]:
    def provide(name: str):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return None, None, None
        return dist.version, dist.requires or [], str(dist.locate_file(""))

    return walk(provide, None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, help="the wheel folder (.whl)")
    parser.add_argument("--installed", action="store_true", help="check this interpreter's installed packages")
    args = parser.parse_args()
    if args.installed == (args.folder is not None):
        parser.error("give a wheel folder or --installed")
    problems = check_installed() if args.installed else check_wheels(args.folder)
    what = "installed packages" if args.installed else f"wheels in {args.folder} + the H100/H200 image's packages"
    for line in problems:
        print(f"  {line}")
    print(f"requirements of skinfusion: {len(problems)} problem(s) with the {what}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
