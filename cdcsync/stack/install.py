"""What the local stack needs installed: Debian packages, a JVM, Maven, and the jars.

Nothing is assumed to be on the machine already: when running as root, missing Debian
packages are installed; otherwise the error names the exact package to install. The JVM
jars are resolved from Maven Central by the pinned POMs under ``connectors/jvm`` and
cached by POM content, so a second run resolves nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cdcsync.errors import StackError
from cdcsync.stack import procs

PG_BIN = Path("/usr/lib/postgresql/15/bin")

#: Debian package providing each command the stack runs.
DEBIAN_PACKAGES: dict[str, str] = {
    "postgres": "postgresql-15",
    "pg_dump": "postgresql-client-15",
    "java": "openjdk-17-jre-headless",
    "mvn": "maven",
    "pgbouncer": "pgbouncer",
    "prometheus": "prometheus",
    "pgcopydb": "pgcopydb",
}

#: Commands every stack needs; the others are installed by ``stack install --all``.
CORE_COMMANDS = ("postgres", "pg_dump", "java", "mvn")
EXTRA_COMMANDS = ("pgbouncer", "prometheus", "pgcopydb")

JVM_PROJECTS = {
    "libs": "kafka",
    "plugins/debezium-connector-postgres": "debezium-postgres",
    "plugins/debezium-connector-jdbc": "debezium-jdbc",
}
#: Resolved beside the others but outside their cache key, each with a marker holding its
#: own POM's hash: adding one does not re-resolve every stack's jars.
EXTRA_JVM_PROJECTS = {
    # Apicurio's Avro converter, for connectors that publish Avro through a registry.
    "plugins/apicurio-converter": "apicurio-converter",
}
#: The schema registry, built into a runnable application on first use only.
REGISTRY_PROJECT = "apicurio-registry"
_MAVEN_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"


def repo_root() -> Path:
    """The source tree, where ``connectors/jvm`` holds the pinned POMs."""
    return Path(__file__).resolve().parents[2]


def find_command(name: str) -> str | None:
    """Path of a stack command, honouring ``CDCSYNC_<NAME>`` overrides (used by tests)."""
    override = os.environ.get(f"CDCSYNC_{name.upper()}_BIN")
    if override is not None:
        return override if Path(override).is_file() and os.access(override, os.X_OK) else None
    if name in ("postgres", "initdb", "pg_ctl"):
        candidate = PG_BIN / name
        return str(candidate) if candidate.exists() else None
    if name == "pg_dump":
        candidate = PG_BIN / "pg_dump"
        if candidate.exists():
            return str(candidate)
    return shutil.which(name)


def is_root() -> bool:
    return os.geteuid() == 0


@dataclass
class InstallReport:
    """What an install step did, with timings for the run's report."""

    installed: list[str]
    seconds: float


def ensure_commands(commands: tuple[str, ...], *, install: bool) -> InstallReport:
    """Make sure each command exists, installing its Debian package when allowed."""
    import time

    started = time.monotonic()
    missing = [c for c in commands if find_command(c) is None]
    if not missing:
        return InstallReport([], time.monotonic() - started)
    packages = sorted({DEBIAN_PACKAGES[c] for c in missing})
    if not install or not is_root() or shutil.which("apt-get") is None:
        raise StackError(
            f"missing {', '.join(missing)}: install the Debian package(s) "
            f"{' '.join(packages)} (apt-get install -y {' '.join(packages)})"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    procs.run(["apt-get", "update", "-qq"], what="apt-get update", env=env)
    procs.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        what=f"apt-get install {' '.join(packages)}",
        env=env,
    )
    still = [c for c in missing if find_command(c) is None]
    if still:
        raise StackError(f"installed {' '.join(packages)} but {', '.join(still)} is still missing")
    return InstallReport(packages, time.monotonic() - started)


def jar_cache_dir() -> Path:
    """Where resolved jars live, keyed by the POMs' content."""
    base = os.environ.get("CDCSYNC_JAR_CACHE")
    if base:
        return Path(base)
    digest = hashlib.sha256()
    root = repo_root() / "connectors" / "jvm"
    for name in sorted(JVM_PROJECTS.values()):
        digest.update((root / name / "pom.xml").read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "cdcsync" / "jvm" / digest.hexdigest()[:16]


def resolve_jars() -> tuple[Path, InstallReport]:
    """Resolve the broker, Connect and connector jars once; return the cache folder."""
    import time

    started = time.monotonic()
    target = jar_cache_dir()
    done_marker = target / ".complete"
    if done_marker.exists():
        extra = resolve_extra_jars(target)
        return target, InstallReport(extra, time.monotonic() - started)
    mvn = find_command("mvn")
    if mvn is None:
        raise StackError("missing mvn: install the Debian package maven")
    root = repo_root() / "connectors" / "jvm"
    resolved: list[str] = []
    for folder, project in JVM_PROJECTS.items():
        _copy_dependencies(mvn, root / project / "pom.xml", target / folder, project)
        resolved.append(project)
    done_marker.write_text("ok\n")
    resolved.extend(resolve_extra_jars(target))
    return target, InstallReport(resolved, time.monotonic() - started)


def _copy_dependencies(mvn: str, pom: Path, out: Path, project: str) -> None:
    if out.exists():
        shutil.rmtree(out)
    procs.run(
        [
            mvn,
            "-B",
            "-q",
            "-f",
            str(pom),
            f"{_MAVEN_DEPENDENCY_PLUGIN}:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={out}",
        ],
        what=f"resolving jars for {project}",
        timeout=1200,
    )
    if not any(out.glob("*.jar")):
        raise StackError(f"resolving jars for {project}: no jar was copied to {out}")


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def resolve_extra_jars(target: Path) -> list[str]:
    """Resolve :data:`EXTRA_JVM_PROJECTS` into ``target``, each again only if its POM changed.

    Several stacks share ``target``: a folder is filled under a private name and renamed
    into place, so a Connect worker starting meanwhile sees it whole or not at all.
    """
    root = repo_root() / "connectors" / "jvm"
    resolved: list[str] = []
    for folder, project in EXTRA_JVM_PROJECTS.items():
        pom = root / project / "pom.xml"
        out = target / folder
        marker = target / f".complete-{project}"
        digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:16]
        if marker.exists() and marker.read_text().strip() == digest and out.exists():
            continue
        mvn = find_command("mvn")
        if mvn is None:
            raise StackError("missing mvn: install the Debian package maven")
        scratch = target / f".tmp-{project}-{os.getpid()}"
        _copy_dependencies(mvn, pom, scratch, project)
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        scratch.rename(out)
        marker.write_text(digest + "\n")
        resolved.append(project)
    return resolved


def build_registry() -> tuple[Path, InstallReport]:
    """Build the schema registry application once; return its runnable jar.

    The Maven project under ``connectors/jvm/apicurio-registry`` is copied to the cache
    (the source tree stays clean) and packaged there, keyed by the project's content.
    """
    import time

    started = time.monotonic()
    source = repo_root() / "connectors" / "jvm" / REGISTRY_PROJECT
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    build = cache / "cdcsync" / "jvm" / f"{REGISTRY_PROJECT}-{_tree_digest(source)}"
    runner = build / "target" / "apicurio-registry-local-1-runner.jar"
    if (build / ".complete").exists() and runner.exists():
        return runner, InstallReport([], time.monotonic() - started)
    mvn = find_command("mvn")
    if mvn is None:
        raise StackError("missing mvn: install the Debian package maven")
    if build.exists():
        shutil.rmtree(build)
    shutil.copytree(source, build)
    procs.run(
        [mvn, "-B", "-q", "-f", str(build / "pom.xml"), "package", "-DskipTests"],
        what=f"building the schema registry ({REGISTRY_PROJECT})",
        timeout=1800,
    )
    if not runner.exists():
        raise StackError(f"building {REGISTRY_PROJECT}: {runner} was not produced")
    (build / ".complete").write_text("ok\n")
    return runner, InstallReport([REGISTRY_PROJECT], time.monotonic() - started)
