"""Great Expectations suite over a dataset: its manifest plus what each image file really holds.

Size: one module on purpose (~620 lines): the frames' columns, the checks that read them and the messages that
quote them change together; split, each part would import the others' private helpers.

A dataset folder is an ImageFolder tree (`<split>/<label>/<file>`) with `manifest.csv` beside it
(see `tasks.data.manifest`). Before a dataset becomes a data version, `validate_dataset` reads every
file the manifest names (exists? bytes match the recorded sha256? decodes? size? mode?) into one
pandas DataFrame, one row per manifest row, and a second DataFrame of per-split class counts, and
runs a GX 1.x expectation suite over each:

    images frame                                  classes frame (one row per split x class)
      labels in class set        (in set)           class counts at least the minimum (A >= B)
      split is train/val/test    (in set)           no class above N% of a split      (between)
      source is generated/human/auto (in set)
      manifest files exist       (in set [True])
      sha256 matches file bytes  (in set [True])
      images decode              (in set [True])
      width / height within bounds (between)
      no duplicate images        (compound unique: split + content hash)
      no image in two splits     (derived: distinct splits per content hash <= 1)

Facts that cannot be known for a row (a missing file has no size) are nulls, which GX's column
map expectations skip: each broken row fails the one check that names its problem, not five.

The result is a `ValidationReport` whose `summary()` a person can act on, and optionally GX data
docs (a static HTML site) that a flow logs to MLflow. Pure function: no Prefect, no MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from saofu.errors import SaofuError
from saofu.settings import get_settings
from tasks.data.image_facts import ImageFacts, read_image_facts
from tasks.data.manifest import BASE_COLUMNS, MANIFEST_NAME, SOURCES, read_manifest

# Same as tasks.data.loading.SPLITS; not imported from there because that module loads torch.
SPLITS = ("train", "val", "test")
IMAGE_FRAME = "images"
CLASS_FRAME = "classes"
DOCS_SITE = "saofu_validation"
EXAMPLES_IN_DETAILS = 10  # offending rows kept per check in the report (data docs hold them all)
EXAMPLES_IN_SUMMARY = 3
ROWS, FILES, IMAGES = ("row", "rows"), ("file", "files"), ("image", "images")

# A check's failure sentence: (offending rows of its frame, how many GX counted) -> text.
Describe = Callable[[pd.DataFrame, int], str]


@dataclass(frozen=True)
class DatasetBounds:
    """Limits the suite checks against.

    Attributes:
        min_width, max_width, min_height, max_height: image size limits in pixels (inclusive).
        min_per_class: per split, the fewest images every class must have; splits not named
            need none (a human-labelled batch may have no test split yet).
        max_class_share: the largest share of one split a single class may take.
    """

    min_width: int = 16
    max_width: int = 1024
    min_height: int = 16
    max_height: int = 1024
    min_per_class: Mapping[str, int] = field(default_factory=lambda: {"train": 1})
    max_class_share: float = 0.9

    def __post_init__(self) -> None:
        if not 0 < self.min_width <= self.max_width or not 0 < self.min_height <= self.max_height:
            raise SaofuError(
                f"image size bounds must satisfy 0 < min <= max, got width {self.min_width}..{self.max_width}"
                f" and height {self.min_height}..{self.max_height}"
            )
        if not 0 < self.max_class_share <= 1:
            raise SaofuError(f"max_class_share must be in (0, 1], got {self.max_class_share}")
        unknown = sorted(set(self.min_per_class) - set(SPLITS))
        if unknown or any(v < 0 for v in self.min_per_class.values()):
            raise SaofuError(
                f"min_per_class takes splits {list(SPLITS)} with counts >= 0, got {dict(self.min_per_class)}"
            )


@dataclass
class CheckResult:
    """One check of the suite.

    Attributes:
        key: short stable id (`labels`, `decodes`, `class_min`, ...), for code and tests.
        name: what a person reads ("labels in class set").
        success: whether every row passed.
        details: `unexpected_count`, `rows` (the first offending rows: path and the values
            that failed), `message` (one sentence naming them) and `error` when the check
            could not run.
        expectation: the GX expectation type behind the check.
    """

    key: str
    name: str
    success: bool
    details: dict[str, Any]
    expectation: str


@dataclass
class ValidationReport:
    """The suite's verdict on one dataset.

    Attributes:
        success: all checks passed.
        checks: one CheckResult per check, in suite order.
        dataset_dir: the dataset validated.
        n_images: manifest rows.
        classes: the class set the labels were checked against.
        docs_path: the GX data docs `index.html`, when docs were asked for.
    """

    success: bool
    checks: list[CheckResult]
    dataset_dir: Path
    n_images: int
    classes: list[str]
    docs_path: Path | None = None

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def check(self, key: str) -> CheckResult:
        """The check with this key (KeyError naming the known keys otherwise)."""
        for c in self.checks:
            if c.key == key:
                return c
        raise KeyError(f"no check {key!r}; checks are {[c.key for c in self.checks]}")

    def summary(self) -> str:
        """A short report: one line per failed check naming the offending rows, then what passed."""
        head = f"dataset {self.dataset_dir} ({self.n_images} images, classes {self.classes}): "
        if self.success:
            lines = [head + f"PASSED all {len(self.checks)} checks"]
        else:
            lines = [head + f"{len(self.failed)} of {len(self.checks)} checks FAILED"]
            lines += [f"FAILED: {c.name} — {c.details.get('message', '')}" for c in self.failed]
            passed = [c.name for c in self.checks if c.success]
            if passed:
                lines.append("passed: " + ", ".join(passed))
        if self.docs_path is not None:
            lines.append(f"data docs: {self.docs_path}")
        return "\n".join(lines)


def raise_if_failed(report: ValidationReport) -> None:
    """Stop here when the suite failed.

    Raises:
        SaofuError: with `report.summary()` as its message.
    """
    if not report.success:
        raise SaofuError(report.summary())


def validate_dataset(
    dataset_dir: str | Path,
    classes: list[str] | None = None,
    bounds: DatasetBounds | None = None,
    docs_dir: str | Path | None = None,
) -> ValidationReport:
    """Run the expectation suite over a dataset's manifest and image files.

    Args:
        dataset_dir: a dataset folder (ImageFolder tree + manifest.csv).
        classes: the allowed labels; default: the labels of the manifest's train rows, or the
            class folders on disk when the manifest has none. Pass the project's class list
            when you have it: only then can a class with no train images be caught.
        bounds: size and class-count limits (DatasetBounds() when None).
        docs_dir: when given, GX data docs are written there (`docs_dir/index.html`).

    Returns:
        A ValidationReport; it does not raise on failed checks (see `raise_if_failed`).

    Raises:
        SaofuError: no dataset folder, no manifest, manifest columns missing, or no class set.
    """
    root = Path(dataset_dir)
    bounds = bounds or DatasetBounds()
    rows = _read_rows(root)
    class_set = sorted(classes) if classes is not None else default_classes(root, rows)
    if not class_set:
        raise SaofuError(
            f"no class set for {root}: pass the classes (the manifest has no train rows to take them from)"
        )
    # Facts of files seen before come from the cache (a file is keyed by inode, size and time:
    # an ingest's hard-linked staged copy of a 17,000-image dataset reads only its new images).
    facts = ImageFacts.open(get_settings().cache_dir / "image-facts.json")
    images = image_frame(root, rows, facts)
    facts.save()
    frames = {IMAGE_FRAME: images, CLASS_FRAME: class_count_frame(images, class_set, bounds)}
    specs = _check_specs(class_set, bounds)
    results, docs_path = _run_suites(frames, specs, Path(docs_dir) if docs_dir is not None else None)
    checks = [_check_result(spec, results.get(spec.key), frames[spec.frame]) for spec in specs]
    return ValidationReport(
        success=all(c.success for c in checks),
        checks=checks,
        dataset_dir=root,
        n_images=len(images),
        classes=class_set,
        docs_path=docs_path,
    )


# --- the frames --------------------------------------------------------------------------------


def _read_rows(root: Path) -> list[dict[str, str]]:
    if not root.is_dir():
        raise SaofuError(f"dataset folder not found: {root}")
    if not (root / MANIFEST_NAME).is_file():
        raise SaofuError(f"no {MANIFEST_NAME} in {root}: a dataset to validate needs its manifest")
    rows = read_manifest(root)
    columns = set(rows[0]) if rows else set(BASE_COLUMNS)
    missing = [c for c in BASE_COLUMNS if c not in columns]
    if missing:
        raise SaofuError(f"{root / MANIFEST_NAME} lacks columns {missing} (needs {list(BASE_COLUMNS)})")
    return rows


def default_classes(root: Path, rows: list[dict[str, str]]) -> list[str]:
    """The class set when none is given: the train rows' labels, else the class folders on disk.

    Args:
        root: the dataset folder.
        rows: its manifest rows.

    Returns:
        Sorted class names.
    """
    labels = {r["label"] for r in rows if r["split"] == "train" and r["label"]}
    if labels:
        return sorted(labels)
    base = root / "train" if (root / "train").is_dir() else root
    return sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in SPLITS and not p.name.startswith("."))


def image_frame(root: Path, rows: list[dict[str, str]], facts: ImageFacts | None = None) -> pd.DataFrame:
    """One row per manifest row: its columns, the file's facts and the derived leak column.

    Args:
        root: the dataset folder.
        rows: its manifest rows.

    Returns:
        A DataFrame with `row` (manifest row index), path, label, split, source, sha256, the facts
        of `read_image_facts`, and `n_splits` (in how many splits this content appears).
    """
    records = []
    for i, r in enumerate(rows):
        base = {c: r.get(c, "") for c in BASE_COLUMNS}
        path = root / r["path"]
        found = facts.read(path, r["sha256"]) if facts is not None else read_image_facts(path, r["sha256"])
        records.append({"row": i, **base, **found})
    columns = ["row", *BASE_COLUMNS, "exists", "content_sha256", "sha256_ok", "decodes", "width", "height", "mode"]
    df = pd.DataFrame.from_records(records, columns=columns)
    # Nullable dtypes keep "unknown" as a null that GX skips, instead of turning it into False/NaN.
    dtypes = {"exists": "bool", "sha256_ok": "boolean", "decodes": "boolean", "width": "Int64", "height": "Int64"}
    df = df.astype(dtypes)
    # The same content under two rows of different splits is a leak; counted on the bytes on disk
    # (the manifest's hash falls back only for missing files) so a stale hash cannot hide one.
    df["n_splits"] = df.groupby("content_sha256")["split"].transform("nunique").astype("int64")
    return df


def class_count_frame(images: pd.DataFrame, classes: list[str], bounds: DatasetBounds) -> pd.DataFrame:
    """One row per (split, class): count, the split's minimum for it, and its share of the split.

    Splits named in `bounds.min_per_class` are always present, so a class with no images at all
    shows up as a row with count 0.

    Args:
        images: the image frame.
        classes: the class set.
        bounds: where min_per_class and max_class_share come from.

    Returns:
        A DataFrame with row, path (`<split>/<class>`, the folder), split, label, count,
        min_count, split_total and share.
    """
    present = set(images["split"]) & set(SPLITS)
    splits = [s for s in SPLITS if s in present or s in bounds.min_per_class]
    records = []
    for split in splits:
        in_split = images[images["split"] == split]
        total = len(in_split)
        for label in classes:
            count = int((in_split["label"] == label).sum())
            records.append(
                {
                    "row": len(records),
                    "path": f"{split}/{label}",
                    "split": split,
                    "label": label,
                    "count": count,
                    "min_count": int(bounds.min_per_class.get(split, 0)),
                    "split_total": total,
                    "share": count / total if total else 0.0,
                }
            )
    columns = ["row", "path", "split", "label", "count", "min_count", "split_total", "share"]
    return pd.DataFrame.from_records(records, columns=columns)


# --- the suite ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """A check: its key and name, the frame it reads, how to build its expectation, how to say it failed."""

    key: str
    name: str
    frame: str
    expectation: Callable[[Any], Any]  # gxe module -> Expectation (GX is imported lazily)
    describe: Describe
    columns: tuple[str, ...] = ()  # kept beside `path` for each offending row in the details


def _check_specs(classes: list[str], b: DatasetBounds) -> list[_Spec]:
    share = f"{b.max_class_share:.0%}"

    def in_set(column: str, values: list) -> Callable[[Any], Any]:
        return lambda gxe: gxe.ExpectColumnValuesToBeInSet(column=column, value_set=values)

    def between(column: str, lo: float | None, hi: float | None) -> Callable[[Any], Any]:
        return lambda gxe: gxe.ExpectColumnValuesToBeBetween(column=column, min_value=lo, max_value=hi)

    return [
        _Spec(
            "labels",
            "labels in class set",
            IMAGE_FRAME,
            in_set("label", classes),
            _values_message("label", ROWS, f"with labels not in {classes}"),
            ("label", "split"),
        ),
        _Spec(
            "splits",
            f"split in {list(SPLITS)}",
            IMAGE_FRAME,
            in_set("split", list(SPLITS)),
            _values_message("split", ROWS, f"with a split not in {list(SPLITS)}"),
            ("split",),
        ),
        _Spec(
            "sources",
            f"source in {list(SOURCES)}",
            IMAGE_FRAME,
            in_set("source", list(SOURCES)),
            _values_message("source", ROWS, f"with a source not in {list(SOURCES)}"),
            ("source",),
        ),
        _Spec(
            "files_exist",
            "manifest files exist",
            IMAGE_FRAME,
            in_set("exists", [True]),
            _paths_message(("manifest row", "manifest rows"), "whose file is missing"),
        ),
        _Spec(
            "sha256_matches",
            "sha256 matches file bytes",
            IMAGE_FRAME,
            in_set("sha256_ok", [True]),
            _paths_message(FILES, "whose bytes differ from the manifest's sha256 (changed after labelling?)"),
            ("sha256", "content_sha256"),
        ),
        _Spec(
            "decodes",
            "images decode",
            IMAGE_FRAME,
            in_set("decodes", [True]),
            _paths_message(FILES, "that do not decode as images"),
        ),
        _Spec(
            "width",
            f"width within {b.min_width}..{b.max_width} px",
            IMAGE_FRAME,
            between("width", b.min_width, b.max_width),
            _values_message("width", IMAGES, f"with width outside {b.min_width}..{b.max_width}", "{} px"),
            ("width", "height"),
        ),
        _Spec(
            "height",
            f"height within {b.min_height}..{b.max_height} px",
            IMAGE_FRAME,
            between("height", b.min_height, b.max_height),
            _values_message("height", IMAGES, f"with height outside {b.min_height}..{b.max_height}", "{} px"),
            ("width", "height"),
        ),
        _Spec(
            "unique_content",
            "no duplicate images",
            IMAGE_FRAME,
            lambda gxe: gxe.ExpectCompoundColumnsToBeUnique(column_list=["split", "content_sha256"]),
            _groups_message(ROWS, "repeat an image within one split"),
            ("split", "content_sha256"),
        ),
        _Spec(
            "split_leak",
            "no image in two splits",
            IMAGE_FRAME,
            between("n_splits", None, 1),
            _groups_message(ROWS, "hold an image that is in more than one split (train/test leak)"),
            ("split", "content_sha256"),
        ),
        _Spec(
            "class_min",
            "class counts at least the minimum",
            CLASS_FRAME,
            lambda gxe: gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="count", column_B="min_count", or_equal=True
            ),
            _counts_message(("class", "classes"), "below the minimum count", "{path} has {count} (min {min_count})"),
            ("count", "min_count"),
        ),
        _Spec(
            "class_share",
            f"no class above {share} of a split",
            CLASS_FRAME,
            between("share", None, b.max_class_share),
            _counts_message(
                ("class", "classes"), f"above {share} of their split", "{path} {share:.0%} ({count} of {split_total})"
            ),
            ("count", "split_total", "share"),
        ),
    ]


def _run_suites(
    frames: dict[str, pd.DataFrame], specs: list[_Spec], docs_dir: Path | None
) -> tuple[dict[str, Any], Path | None]:
    """Run one GX suite per frame in an ephemeral context; build data docs when asked.

    Returns:
        ({check key: ExpectationValidationResult}, path of the data docs index or None).
    """
    import great_expectations as gx  # lazy: GX takes seconds to import, the CLI should not pay it
    import great_expectations.expectations as gxe

    context = gx.get_context(mode="ephemeral", project_config=_gx_config())
    if docs_dir is not None:
        context.add_data_docs_site(DOCS_SITE, _docs_site_config(Path(docs_dir)))
    source = context.data_sources.add_pandas("saofu")
    # COMPLETE lists every offending row; `row` and `path` come back with each so they can be
    # found in the frame and read in the data docs.
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": ["row", "path"]}
    results: dict[str, Any] = {}
    for frame_name, df in frames.items():
        suite = context.suites.add(gx.ExpectationSuite(name=f"saofu_{frame_name}"))
        for spec in (s for s in specs if s.frame == frame_name):
            expectation = spec.expectation(gxe)
            expectation.description = spec.name  # shown in the data docs
            expectation.meta = {"saofu_check": spec.key}
            suite.add_expectation(expectation)
        batch = source.add_dataframe_asset(frame_name).add_batch_definition_whole_dataframe("all")
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"saofu_{frame_name}", data=batch, suite=suite)
        )
        # Each frame is its own batch, so the definitions run one by one (a Checkpoint would hand
        # both the same dataframe); their results land in the context's store for the data docs.
        run = definition.run(batch_parameters={"dataframe": df}, result_format=result_format)
        for r in run.results:  # GX does not keep suite order: match results by our meta key
            results[r.expectation_config.meta["saofu_check"]] = r
    docs_path = None
    if docs_dir is not None:
        context.build_data_docs(site_names=[DOCS_SITE])
        docs_path = Path(docs_dir) / "index.html"
    return results, docs_path


def _gx_config() -> Any:
    """An in-memory context config with analytics and progress bars off (both are context variables in GX 1.x)."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    return DataContextConfig(
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        store_backend_defaults=InMemoryStoreBackendDefaults(),
    )


def _docs_site_config(docs_dir: Path) -> dict[str, Any]:
    return {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }


# --- reading the results -----------------------------------------------------------------------


def _check_result(spec: _Spec, result: Any, frame: pd.DataFrame) -> CheckResult:
    """Turn one GX result into a CheckResult whose message names the offending rows."""
    if result is None:
        details = {"error": "the check produced no result", "message": "the check produced no result"}
        return CheckResult(spec.key, spec.name, False, details, "")
    expectation = result.expectation_config.type
    error = _exception_message(result.exception_info)
    if error:
        details = {"error": error, "message": f"the check could not run: {error}"}
        return CheckResult(spec.key, spec.name, False, details, expectation)
    info = result.result or {}
    count = int(info.get("unexpected_count") or 0)
    details: dict[str, Any] = {"unexpected_count": count}
    if not result.success:
        flagged = {int(i["row"]) for i in info.get("unexpected_index_list") or []}
        offending = frame[frame["row"].isin(flagged)]
        details["rows"] = _plain_rows(offending.head(EXAMPLES_IN_DETAILS), spec)
        details["message"] = spec.describe(offending, count)
    return CheckResult(spec.key, spec.name, bool(result.success), details, expectation)


def _exception_message(info: Any) -> str | None:
    # GX reports an exception either at the top level or per metric, keyed by metric id.
    if not info:
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def _plain_rows(rows: pd.DataFrame, spec: _Spec) -> list[dict[str, Any]]:
    """JSON-ready dicts (no numpy scalars, no pandas NA) of path plus the columns that failed."""
    columns = ["path", *spec.columns]
    out = []
    for record in rows[columns].astype(object).to_dict("records"):
        out.append({k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in record.items()})
    return out


def _listed(items: list[str], total: int) -> str:
    shown = items[:EXAMPLES_IN_SUMMARY]
    more = total - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _counted(count: int, noun: tuple[str, str], rest: str) -> str:
    """'1 row with ...' / '3 rows with ...'."""
    return f"{count} {noun[0] if count == 1 else noun[1]} {rest}"


def _values_message(column: str, noun: tuple[str, str], rest: str, fmt: str = "{!r}") -> Describe:
    def describe(rows: pd.DataFrame, count: int) -> str:
        items = [f"{fmt.format(_plain(v))} ({p})" for v, p in zip(rows[column], rows["path"])]
        return f"{_counted(count, noun, rest)}: {_listed(items, count)}"

    return describe


def _paths_message(noun: tuple[str, str], rest: str) -> Describe:
    def describe(rows: pd.DataFrame, count: int) -> str:
        return f"{_counted(count, noun, rest)}: {_listed(list(rows['path']), count)}"

    return describe


def _groups_message(noun: tuple[str, str], rest: str) -> Describe:
    # Rows sharing one content hash are shown together: "train/fu/a.png = test/fu/b.png".
    def describe(rows: pd.DataFrame, count: int) -> str:
        groups = [" = ".join(g["path"]) for _, g in rows.groupby("content_sha256", sort=False)]
        return f"{_counted(count, noun, rest)}: {_listed(groups, len(groups))}"

    return describe


def _counts_message(noun: tuple[str, str], rest: str, fmt: str) -> Describe:
    def describe(rows: pd.DataFrame, count: int) -> str:
        items = [fmt.format(**{k: _plain(v) for k, v in r.items()}) for r in rows.to_dict("records")]
        return f"{_counted(count, noun, rest)}: {_listed(items, count)}"

    return describe


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
