"""Data versions with DVC: every accepted dataset becomes an immutable, restorable version.

The versions live in a data registry, a git + DVC repository created on first use:

    $SAOFU_HOME/.saofu/data-registry/     git + DVC repo (the registry)
        datasets/<name>.dvc               DVC's record of the dataset folder (directory md5, files)
        tags <name>@v<N>                  one annotated git tag per version; its message is the
                                          version's metadata as JSON (the tag is the version)
    $SAOFU_HOME/.saofu/dvc-remote/        the default DVC remote (SAOFU_DVC_REMOTE: any DVC URL)
    $SAOFU_HOME/.saofu/data-registry.lock serialises writers (two flows creating versions)

`create_version` copies the dataset into the registry, `dvc add`s it, pushes its objects to the
remote, commits the `.dvc` file and tags the commit. The order matters: the tag comes last, so a
version exists only once its data is on the remote, and a failure mid-way leaves an untagged
commit at most; earlier versions are never touched (DVC's storage is content-addressed and
append-only, git history and tags are only added to). The registry's workspace copy of a
dataset stays between versions, its files hard links into the DVC cache (`cache.type hardlink`:
no third copy of the data), and is brought up to date file by file (`_sync_tree`): the next
version copies and hashes only the files that changed, which keeps a version of a big dataset
with a few new labels at a few seconds.

`checkout_version` runs `dvc get <registry> datasets/<name> --rev <name>@v<N>`, which clones the
registry at that tag and fetches from the remote, so it works with no workspace copy and no cache,
and checks the restored files against the fingerprint recorded at creation.

Identity of content is our own fingerprint (sha256 over every file's relative path and sha256),
recorded in the tag; it does not depend on DVC's internal hashing, and `version_of` can compute
it for any folder without touching the registry. DVC runs through its command line (the `dvc`
next to this Python), so its global state (logging, locks) never leaks into the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from filelock import FileLock

from saofu.errors import SaofuError
from saofu.settings import get_settings
from tasks.data.file_digests import FileDigests
from tasks.data.file_walk import path_order, walk_files

REMOTE_ENV = "SAOFU_DVC_REMOTE"
REMOTE_NAME = "storage"
DATASETS_DIR = "datasets"
METADATA_SCHEMA = 1
# Git per command, never the user's global config: an identity, no signing (a global
# commit.gpgsign would prompt or fail), and --no-verify on commits (no global hooks).
GIT_CONFIG = (
    "-c", "user.name=saofu",
    "-c", "user.email=saofu@localhost",
    "-c", "commit.gpgsign=false",
    "-c", "tag.gpgsign=false",
    "-c", "init.defaultBranch=main",
)  # fmt: skip
# Dataset names become git tags (`<name>@v<N>`) and folder names: keep them to safe characters.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VERSION_RE = re.compile(r"^(?P<name>.+)@v(?P<number>[0-9]+)$")


@dataclass(frozen=True)
class DataVersion:
    """One version of a dataset.

    Attributes:
        id: `<name>@v<number>`, also the registry's git tag; what runs log and checkouts take.
        name: the dataset's name.
        number: 1, 2, ... per name.
        md5: DVC's md5 of the directory (`<hex>.dir`), its key in the DVC cache and remote.
        commit: the registry's git commit that holds the version's `.dvc` file.
        n_files: files in the version.
        created_at: ISO 8601 time, UTC.
        message: what the creator said about it.
        fingerprint: sha256 over every file's relative path and sha256 (see `content_fingerprint`).
    """

    id: str
    name: str
    number: int
    md5: str
    commit: str
    n_files: int
    created_at: str
    message: str = ""
    fingerprint: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --- where things live -------------------------------------------------------------------------


def state_dir() -> Path:
    return get_settings().home / ".saofu"


def registry_dir() -> Path:
    """The data registry repository (git + DVC)."""
    return state_dir() / "data-registry"


def remote_url() -> str:
    """The DVC remote: `SAOFU_DVC_REMOTE` (any DVC URL or a local path), else a local folder.

    Local paths are made absolute: a relative path in the registry's config would be resolved
    against wherever DVC runs (a clone in a temporary folder for `dvc get`).
    """
    url = os.environ.get(REMOTE_ENV) or str(state_dir() / "dvc-remote")
    if "://" in url:
        _check_remote_plugin(url)
        return url
    return str(Path(url).expanduser().resolve())


# URL scheme -> (the DVC plugin's import name, its pip package, saofu's extra that installs it)
REMOTE_PLUGINS = {
    "s3": ("dvc_s3", "dvc-s3", "s3"),
    "gs": ("dvc_gs", "dvc-gs", "gs"),
    "gcs": ("dvc_gs", "dvc-gs", "gs"),
    "azure": ("dvc_azure", "dvc-azure", "azure"),
    "az": ("dvc_azure", "dvc-azure", "azure"),
    "ssh": ("dvc_ssh", "dvc-ssh", "ssh"),
    "webdav": ("dvc_webdav", "dvc-webdav", "webdav"),
    "webdavs": ("dvc_webdav", "dvc-webdav", "webdav"),
}


def _check_remote_plugin(url: str) -> None:
    """A remote whose DVC plugin is missing fails here, naming the package, before anything is staged."""
    import importlib.util

    scheme = url.split("://", 1)[0].lower()
    plugin = REMOTE_PLUGINS.get(scheme)
    if plugin and importlib.util.find_spec(plugin[0]) is None:
        raise SaofuError(f"{REMOTE_ENV}={url} needs DVC's {scheme} plugin: pip install '{plugin[1]}' "
                         f"(or install saofu with the extra: pip install -e '.[{plugin[2]}]')")


# --- public API --------------------------------------------------------------------------------


def content_fingerprint(dataset_dir: str | Path, digests: FileDigests | None = None) -> tuple[str, int]:
    """Identity of a folder's content: sha256 over each file's relative path and sha256.

    Args:
        dataset_dir: a dataset folder.
        digests: digests of files read before (`tasks.data.file_digests`); None reads every file
            (what a check of restored files does).

    Returns:
        (hex fingerprint, number of files).
    """
    root = Path(dataset_dir)
    files = walk_files(root)
    lines = []
    for rel in sorted(files, key=path_order):
        path = root / rel
        digest = (digests.sha256(path, files[rel]) if digests is not None
                  else hashlib.sha256(path.read_bytes()).hexdigest())
        lines.append(f"{rel}\0{digest}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest(), len(lines)


def _digests() -> FileDigests:
    """The registry's cache of file digests: versioning a grown dataset hashes only its new files."""
    return FileDigests.open(state_dir() / "file-digests.json")


def create_version(dataset_dir: str | Path, name: str, message: str = "") -> DataVersion:
    """Store a dataset folder as a new DVC version, or return the version that already holds it.

    Args:
        dataset_dir: the dataset folder (ImageFolder tree + manifest.csv, or any files).
        name: the dataset's name, e.g. `fu_world`; letters, digits, `._-`.
        message: recorded with the version (the git commit message and tag metadata).

    Returns:
        The new DataVersion; if this name already has a version with exactly this content,
        that version (nothing new is created).

    Raises:
        SaofuError: missing or empty folder, bad name, or a git/DVC command failing (the
            message carries its error; earlier versions are left intact).
    """
    return _version(Path(dataset_dir), name, message, any_name=False)


def ensure_version(dataset_dir: str | Path, name: str, message: str = "") -> str:
    """The id of the version holding exactly this folder's content under any name, else of a new one.

    `version_of(...) or create_version(...).id` in one pass over the folder: the fingerprint (a
    stat of every file, 17,000 on the fast retrain's bench) is taken once, not twice.

    Raises:
        SaofuError: as `create_version`.
    """
    return _version(Path(dataset_dir), name, message, any_name=True).id


def _version(src: Path, name: str, message: str, any_name: bool) -> DataVersion:
    _check_name(name)
    digests = _digests()
    fingerprint = _fingerprint_dataset(src, digests)
    # DVC's own repo lock fails a second writer at once; this one makes it wait its turn.
    with FileLock(state_dir() / "data-registry.lock"):
        repo = _ensure_registry()
        _discard_unfinished(repo)
        versions = _read_versions(repo)
        for v in versions:
            if (any_name or v.name == name) and v.fingerprint == fingerprint:
                digests.save()
                return v
        number = max((v.number for v in versions if v.name == name), default=0) + 1
        _sync_remote(repo, has_versions=bool(versions))
        version = _store(repo, src, name, number, message, fingerprint, digests)
        digests.save()
        return version


def list_versions(name: str | None = None) -> list[DataVersion]:
    """All versions in the registry, by name then number.

    Args:
        name: only this dataset's versions.

    Returns:
        DataVersions ([] when no registry exists yet).
    """
    repo = registry_dir()
    if not _is_registry(repo):
        return []
    return [v for v in _read_versions(repo) if name is None or v.name == name]


def get_version(version_id: str) -> DataVersion:
    """The version with this id.

    Raises:
        SaofuError: unknown id; the message lists the known ones.
    """
    versions = list_versions()
    for v in versions:
        if v.id == version_id:
            return v
    known = ", ".join(v.id for v in versions) or "none yet"
    raise SaofuError(f"unknown data version {version_id!r}; known versions: {known}")


def checkout_version(version_id: str, out_dir: str | Path, force: bool = False) -> Path:
    """Restore exactly the files of a version into out_dir, from the DVC remote.

    Args:
        version_id: `<name>@v<N>`.
        out_dir: where the dataset folder goes; must be missing or empty unless `force`.
        force: replace whatever out_dir holds.

    Returns:
        out_dir.

    Raises:
        SaofuError: unknown version, out_dir not empty, the remote not holding the data, or
            the restored files not matching the version's fingerprint.
    """
    version = get_version(version_id)
    out = Path(out_dir)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise SaofuError(f"{out} is not empty; choose an empty folder or pass force to replace it")
    repo = registry_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Restore beside out_dir, check, then move into place: out_dir never holds a partial copy.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.checkout-", dir=out.parent))
    try:
        restored = staging / "data"
        # The tag's commit may name an older remote URL; the registry's current one holds every
        # version (a remote change copies them over), so it overrides.
        url = _committed_remote_url(repo)
        _dvc(staging, "get", str(repo), _dataset_path(version.name), "--rev", version.id,
             "-o", str(restored), "--remote-config", f"url={url}")  # fmt: skip
        fingerprint, _ = content_fingerprint(restored)
        if fingerprint != version.fingerprint:
            raise SaofuError(
                f"files restored for {version.id} do not match its fingerprint: the remote {url} is damaged"
            )
        _remove(out)
        restored.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def version_of(dataset_dir: str | Path) -> str | None:
    """The id of the version holding exactly this folder's content, if there is one.

    Args:
        dataset_dir: a dataset folder.

    Returns:
        The version id (the first match by name, then number), or None.
    """
    versions = list_versions()
    if not versions:
        return None
    digests = _digests()
    fingerprint, _ = content_fingerprint(dataset_dir, digests)
    digests.save()
    return next((v.id for v in versions if v.fingerprint == fingerprint), None)


# --- creating a version ------------------------------------------------------------------------


def _check_name(name: str) -> None:
    # Git refuses `..` and a trailing `.lock` or `.` in ref names.
    if not NAME_RE.match(name) or ".." in name or name.endswith((".lock", ".")):
        raise SaofuError(f"dataset name {name!r} must be letters, digits and ._- (e.g. fu_world)")


def _fingerprint_dataset(src: Path, digests: FileDigests | None = None) -> str:
    if not src.is_dir():
        raise SaofuError(f"dataset folder not found: {src}")
    fingerprint, n_files = content_fingerprint(src, digests)
    if n_files == 0:
        raise SaofuError(f"dataset folder {src} holds no files")
    return fingerprint


def _dataset_path(name: str) -> str:
    return f"{DATASETS_DIR}/{name}"


def _store(repo: Path, src: Path, name: str, number: int, message: str, fingerprint: str,
           digests: FileDigests | None = None) -> DataVersion:
    """Copy, `dvc add`, push, commit, tag; the tag last, so only complete versions exist."""
    rel = _dataset_path(name)
    workspace = repo / rel
    version_id = f"{name}@v{number}"
    _use_linked_cache(repo)
    _sync_tree(src, workspace)
    copied, _ = content_fingerprint(workspace, digests)
    if copied != fingerprint:
        # A file changed without its size or time changing, or the source changed under us: copy afresh.
        _remove(workspace)
        shutil.copytree(src, workspace)
        copied, _ = content_fingerprint(workspace)
        if copied != fingerprint:
            raise SaofuError(f"{src} changed while it was being versioned; try again when it is complete")
    _dvc(repo, "add", rel)
    md5, n_files = _read_dvc_file(repo / f"{rel}.dvc")
    _dvc(repo, "push", "-r", REMOTE_NAME, f"{rel}.dvc")
    _git(repo, "add", f"{rel}.dvc", f"{DATASETS_DIR}/.gitignore", ".dvc/config")
    # --allow-empty: a run that died after its commit but before its tag left this very tree
    # committed already; the version still gets a commit of its own to carry the tag.
    subject = f"{version_id}: {message}" if message else version_id
    _git(repo, "commit", "-q", "--no-verify", "--allow-empty", "-m", subject)
    commit = _git(repo, "rev-parse", "HEAD").strip()
    version = DataVersion(
        id=version_id,
        name=name,
        number=number,
        md5=md5,
        commit=commit,
        n_files=n_files,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        message=message,
        fingerprint=fingerprint,
    )
    metadata = {"schema": METADATA_SCHEMA, **{k: v for k, v in version.to_dict().items() if k != "commit"}}
    _git(repo, "tag", "-a", version_id, "-m", json.dumps(metadata, sort_keys=True), commit)
    return version


def _sync_tree(src: Path, dst: Path) -> None:
    """Make `dst` hold exactly `src`'s files, copying only those that are new or differ in size or
    modification time (copies keep the source's time) and deleting those `src` lacks.

    A differing file is replaced through a new file and a rename, never written in place: the one
    in `dst` may be a hard link into the DVC cache.
    """
    if dst.exists() and not dst.is_dir():
        _remove(dst)
    have, want = walk_files(dst), walk_files(src)
    gone = have.keys() - want.keys()
    for rel in gone:
        (dst / rel).unlink()
    for rel, st in want.items():
        old = have.get(rel)
        if old is not None and old.st_size == st.st_size and old.st_mtime_ns == st.st_mtime_ns:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.saofu-new")
        shutil.copy2(src / rel, tmp)
        os.replace(tmp, target)
    if gone:  # folders emptied by the deletions go too
        for folder in sorted((p for p in dst.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(folder.iterdir()):
                folder.rmdir()


def _use_linked_cache(repo: Path) -> None:
    """Workspace files as hard links into the DVC cache (set once per registry, machine-local)."""
    local = repo / ".dvc" / "config.local"
    if not (local.is_file() and "hardlink" in local.read_text()):
        _dvc(repo, "config", "--local", "cache.type", "hardlink,copy")


def _read_dvc_file(path: Path) -> tuple[str, int]:
    out = yaml.safe_load(path.read_text())["outs"][0]
    return str(out["md5"]), int(out.get("nfiles", 0))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --- the registry ------------------------------------------------------------------------------


def _is_registry(repo: Path) -> bool:
    return (repo / ".git").exists() and (repo / ".dvc").is_dir()


def _ensure_registry() -> Path:
    """The registry, created when missing: built in a temporary folder, then renamed into place,
    so a failed creation never leaves a half-made registry behind."""
    repo = registry_dir()
    if _is_registry(repo):
        return repo
    if repo.exists() and any(repo.iterdir()):
        raise SaofuError(f"{repo} exists but is not a data registry (no .git and .dvc); move it away")
    staging = Path(tempfile.mkdtemp(prefix="data-registry.new-", dir=repo.parent))
    try:
        _git(staging, "init", "-q")
        _dvc(staging, "init", "-q")
        # No network here, and none wanted: no usage reports, no update checks.
        _dvc(staging, "config", "core.analytics", "false")
        _dvc(staging, "config", "core.check_update", "false")
        _dvc(staging, "remote", "add", "-d", REMOTE_NAME, remote_url())
        _git(staging, "add", ".dvc/config", ".dvc/.gitignore", ".dvcignore")
        _git(staging, "commit", "-q", "--no-verify", "-m", "saofu data registry")
        if repo.exists():
            repo.rmdir()
        staging.rename(repo)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return repo


def _discard_unfinished(repo: Path) -> None:
    # A create that failed mid-way may have left a changed .dvc file or config; tracked files go
    # back to the last commit (untracked data and the DVC cache are left alone).
    _git(repo, "reset", "-q", "--hard", "HEAD")


def _sync_remote(repo: Path, has_versions: bool) -> None:
    """Point the registry at the configured remote; when it moved, copy every version there."""
    wanted = remote_url()
    if _committed_remote_url(repo) == wanted:
        return
    _dvc(repo, "remote", "add", "-d", "-f", REMOTE_NAME, wanted)
    if not has_versions:
        return
    try:
        # Earlier versions must stay restorable from the new remote; they come from the cache.
        _dvc(repo, "push", "-r", REMOTE_NAME, "--all-tags")
    except SaofuError as exc:
        _git(repo, "checkout", "--", ".dvc/config")  # keep pointing at the remote that works
        raise SaofuError(f"cannot copy the existing data versions to the new DVC remote {wanted}: {exc}") from exc


def _committed_remote_url(repo: Path) -> str:
    """The remote URL in the registry's last commit.

    Read from the commit rather than the working tree, which a create that failed mid-way may
    have left pointing elsewhere. configobj is the parser DVC itself uses for this file.
    """
    from configobj import ConfigObj

    config = ConfigObj(_git(repo, "show", "HEAD:.dvc/config").splitlines())
    return str(config[f'remote "{REMOTE_NAME}"']["url"])


def _read_versions(repo: Path) -> list[DataVersion]:
    """Versions from the registry's tags (one git call); tags that are not ours are skipped."""
    fmt = "%(refname:short)%00%(*objectname)%00%(contents:subject)"
    versions = []
    for line in _git(repo, "for-each-ref", "refs/tags", f"--format={fmt}").splitlines():
        tag, commit, subject = (line.split("\0") + ["", ""])[:3]
        match = VERSION_RE.match(tag)
        try:
            meta = json.loads(subject)
        except json.JSONDecodeError:
            continue
        if not match or not isinstance(meta, dict) or meta.get("schema") != METADATA_SCHEMA:
            continue
        versions.append(
            DataVersion(
                id=tag,
                name=match["name"],
                number=int(match["number"]),
                md5=str(meta.get("md5", "")),
                commit=commit,
                n_files=int(meta.get("n_files", 0)),
                created_at=str(meta.get("created_at", "")),
                message=str(meta.get("message", "")),
                fingerprint=str(meta.get("fingerprint", "")),
            )
        )
    return sorted(versions, key=lambda v: (v.name, v.number))


# --- running git and DVC -----------------------------------------------------------------------


def _git(cwd: Path, *args: str) -> str:
    git = shutil.which("git")
    if git is None:
        raise SaofuError("git is not installed; data versions need git and DVC")
    return _run([git, *GIT_CONFIG, *args], cwd, {**os.environ, "GIT_TERMINAL_PROMPT": "0"}, f"git {' '.join(args)}")


def _dvc(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        # DVC keeps per-repo indexes in a site cache (default /var/tmp/dvc); keep it with our state.
        "DVC_SITE_CACHE_DIR": str(state_dir() / "dvc-site-cache"),
        "GIT_TERMINAL_PROMPT": "0",
    }
    return _run([_dvc_executable(), *args], cwd, env, f"dvc {' '.join(args)}")


def _dvc_executable() -> str:
    # The dvc installed with this Python first: a `dvc` on PATH may be another version.
    beside = Path(sys.executable).parent / "dvc"
    if beside.is_file():
        return str(beside)
    found = shutil.which("dvc")
    if found is None:
        raise SaofuError("the dvc command was not found next to this Python or on PATH; install dvc")
    return found


def _run(cmd: list[str], cwd: Path, env: dict[str, str], shown: str) -> str:
    """Run a command; on failure raise SaofuError with the command as typed and its last lines."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        # DVC ends every error with a support link; only the lines about the problem are kept.
        lines = [x.strip() for x in lines if x.strip() and not x.startswith("Having any troubles?")]
        raise SaofuError(f"`{shown}` failed in {cwd}: {' | '.join(lines[-6:])}")
    return proc.stdout
