"""Bad input at every door gets a clear answer and stores nothing partly (issue 15, bad-input corpus).

The corpus (bench/reliability/corpus.py) generates broken, truncated, bomb and malformed images,
ingest attacks, malformed flow parameters and corrupt ONNX graphs; these tests offer it at small
size and assert each kind's outcome. What the corpus found and this change fixed:

- serving: a 16-bit grey PNG reached the model clipped to white (now scaled to 8 bits); an SVG was
  answered 422 "not an image" (now 415 naming SVG); a PNG whose zTXt chunk inflates past Pillow's
  limit was answered 422 "not an image" (now 413 naming the decompression bomb);
- flow parameters: a class named `..`, `fu\\0x` or with a newline, a refined class `../fu`, a study
  named `../../etc` or `/tmp/x` (its files go under <runs>/<study_name>), and infinite timeouts
  were accepted;
- deployment: a graph whose `image_size` metadata is not a number, or not its input's size, was
  refused with Python's int() message or onnxruntime's shape error, not one naming the entry.

Training's loader (tasks/data/loading.py) names and leaves out what it cannot decode, refuses
bombs from the header and scales 16-bit images as serving does; the one kind it still takes in is
`TRAINING_GAPS_TODAY`, and the test fails on any new one.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from bench.reliability import corpus
from bench.reliability.section import Case
from deploy.app import ServeConfig, create_app
from deploy.model_source import ModelSource

# Kinds training's loader does not handle yet (tasks/data/loading.py is fixed elsewhere): a bomb
# or text-chunk bomb is a traceback (DecompressionBombError, ValueError escape `_decode`), a JPEG
# whose header announces 5000x4000 with 16x16 of data is decoded grey-filled and trained on, and
# a 16-bit grey PNG trains clipped to white.
# What training still takes in: a JPEG whose header announces 5000x4000 but whose data ends after a
# few blocks. libjpeg fills the rest grey without an error, and the size alone is no reason to
# refuse (a 20-megapixel phone photo is a fine training image); telling the two apart needs the
# whole decode. Serving refuses it by its size (413).
TRAINING_GAPS_TODAY = {"JPEG over the pixel limit (5000x4000 header)"}


def _failed(cases: list[Case]) -> list[str]:
    return [f"{c.kind} -> {c.target}: expected {c.expected}; got {c.got}" for c in cases if not c.ok]


@pytest.fixture(scope="module")
def serving_cases(tmp_path_factory) -> list[Case]:
    with TestClient(corpus.serving_app_for_corpus(tmp_path_factory.mktemp("serving"))) as client:
        return corpus.offer_to_serving(client)


@pytest.fixture(scope="module")
def param_cases() -> list[Case]:
    return corpus.offer_to_flow_params()


@pytest.fixture(scope="module")
def ingest_cases(tmp_path_factory) -> list[Case]:
    home = tmp_path_factory.mktemp("ingest-home")
    with corpus.project_home(home):  # the suite's image-facts cache lands here
        return corpus.offer_to_ingest(tmp_path_factory.mktemp("ingest"))


@pytest.mark.timeout(60)
def test_the_serving_app_answers_every_image_kind_with_a_named_4xx_or_the_right_pixels(serving_cases):
    assert _failed(serving_cases) == []
    by_kind = {c.kind: c for c in serving_cases}
    assert by_kind["SVG"].got.startswith("415") and "SVG" in by_kind["SVG"].got
    assert by_kind["PNG text-chunk bomb (64 MiB zTXt)"].got.startswith("413")
    assert by_kind["16-bit grey PNG"].got.startswith("200")
    assert by_kind["healthz after the corpus"].ok  # still healthy after all of it
    assert len(serving_cases) >= 28


@pytest.mark.timeout(90)  # its fixture imports the flows (Prefect, torch): ~25 s alone on the 2-core box
def test_each_flow_parameter_model_refuses_malformed_values_naming_the_field(param_cases):
    assert _failed(param_cases) == []
    assert {c.target for c in param_cases} == {f"flow parameters ({m})" for m in
                                               ("FastRetrainParams", "ReleaseParams", "SearchFlowParams",
                                                "CycleParams")}


@pytest.mark.timeout(60)
def test_defaults_and_plain_values_still_validate():
    from flows.cycle import CycleParams
    from flows.fast_retrain import FastRetrainParams
    from flows.release import ReleaseParams
    from flows.search import SearchFlowParams

    for model in (FastRetrainParams, ReleaseParams, SearchFlowParams, CycleParams):
        model()  # the Prefect UI's form: every field defaulted, and the defaults valid
    assert FastRetrainParams(changes=[{"name": "fu merchant 2", "refines": "fu"}]).changes[0].name == "fu merchant 2"
    assert SearchFlowParams(study_name="search-20261203", timeout_min=30).study_name == "search-20261203"


@pytest.mark.timeout(120)
def test_ingest_skips_every_attack_rejects_broken_images_and_loses_nothing(ingest_cases):
    assert _failed(ingest_cases) == []
    assert sum(c.lost for c in ingest_cases) == 0
    kinds = {c.kind for c in ingest_cases}
    assert {"unknown label", "empty export", "duplicate tasks", "path attack: symlink out of the pool",
            "split attack: ../", "image corpus batch"} <= kinds


@pytest.mark.timeout(90)
def test_training_loader_gives_a_clear_error_or_the_right_pixels_except_its_known_gaps(tmp_path):
    cases = corpus.offer_to_training(tmp_path)
    not_held = {c.kind for c in cases if not c.ok}
    print("training gaps today:", sorted(not_held))
    assert not_held <= TRAINING_GAPS_TODAY, _failed([c for c in cases if c.kind not in TRAINING_GAPS_TODAY])
    legit = {c.kind for c in cases if "right pixels" in c.expected} - TRAINING_GAPS_TODAY
    assert legit and all(c.ok for c in cases if c.kind in legit)


@pytest.mark.timeout(60)
def test_every_corrupt_graph_is_refused_at_load_naming_what_is_wrong(tmp_path):
    from deploy.model_source import load_model
    from saofu.errors import SaofuError

    for kind, (data, word) in corpus.corrupt_graphs(tmp_path / "graphs").items():
        path = tmp_path / "model.onnx"
        path.write_bytes(data)
        with pytest.raises(SaofuError) as refused:
            load_model(path, "bad-input", "2")
        assert word in str(refused.value), (kind, str(refused.value))


class FolderRegistry(ModelSource):
    """The real ModelSource, its registry a folder: `v<N>.onnx` files and an alias table.

    An MLflow store costs ~30 s to create and fill on the 2-core CI box; what is tested is what
    the source and the app do with a graph once downloaded (refused, kept serving, degraded), which
    is the same whichever store it came from. `offer_corrupt_onnx` runs it on MLflow in the bench.
    """

    def __init__(self, folder: Path, aliases: dict[str, str]):
        super().__init__("bad-input", tracking_uri="sqlite:///unused.db", challenger_alias=None, poll_seconds=0.05)
        self.folder, self.aliases = folder, aliases

    def resolve(self, alias: str) -> str | None:
        return self.aliases.get(alias)

    def download(self, version: str) -> Path:
        folder = Path(tempfile.mkdtemp(prefix=f"v{version}-", dir=self._downloads_root()))
        return Path(shutil.copy(self.folder / f"v{version}.onnx", folder / "model.onnx"))


@pytest.mark.timeout(60)
def test_a_corrupt_graph_promoted_leaves_the_previous_version_answering_and_health_degraded(tmp_path):
    graphs = corpus.corrupt_graphs(tmp_path / "graphs")
    corpus.colour_graph(tmp_path / "v1.onnx")
    versions = {}
    for n, (kind, (data, word)) in enumerate(graphs.items(), start=2):
        (tmp_path / f"v{n}.onnx").write_bytes(data)
        versions[kind] = (str(n), word)
    aliases = {"champion": "1"}
    source = FolderRegistry(tmp_path, aliases)
    app = create_app(ServeConfig(model_name="bad-input", tracking_uri="sqlite:///unused.db"), source)

    cases = corpus.promote_each(app, lambda version: aliases.update(champion=version), versions)
    assert _failed(cases) == []
    assert [c.kind for c in cases] == [*graphs, "good version promoted again"]
    assert len(graphs) >= 8


@pytest.mark.timeout(60)
def test_the_corpus_tries_at_least_15_kinds_of_bad_input(serving_cases, param_cases, ingest_cases):
    kinds = corpus.count_kinds(serving_cases + param_cases + ingest_cases)
    assert kinds >= 15, kinds
