"""``tlmat predict``: the model's own forward on written files, and every bad input as one line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_structures
from pymatgen.core import Lattice, Structure
from torch_geometric.data import Batch

from tlmat.checkpoint import save_checkpoint
from tlmat.cli import main
from tlmat.config import FeaturizerSettings
from tlmat.data import write_frame
from tlmat.graphs import structure_to_graph
from tlmat.models import ModelConfig, build_model
from tlmat.train import TargetScaler

SETTINGS = FeaturizerSettings(cutoff=6.0, max_neighbors=8)
SCALER = TargetScaler(mean=3.0, std=2.0)  # predictions must come back in these units


def tiny_model(seed: int, heads: tuple[str, ...] = ("aa",)):
    torch.manual_seed(seed)
    config = ModelConfig(
        hidden=16, embedding=8, alignn_layers=1, gcn_layers=1, cutoff=SETTINGS.cutoff, heads=heads
    )
    return build_model(config).eval()


def write_checkpoint(path, seed: int = 0, heads: tuple[str, ...] = ("aa",)):
    model = tiny_model(seed, heads)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, SETTINGS, {h: SCALER for h in heads}, str(path), [])
    return model


def forward(model, structures, head: str = "aa") -> np.ndarray:
    """The reference: the model's forward on graphs built from the structures themselves."""
    batch = Batch.from_data_list([structure_to_graph(s, SETTINGS) for s in structures])
    with torch.inference_mode():
        return SCALER.inverse(model(batch, heads=[head])[head]).double().numpy()


@pytest.fixture()
def crystals(tmp_path):
    """Six CIFs written in a folder (with a README that must be ignored), and the structures."""
    structures = make_structures(6, seed=3)
    folder = tmp_path / "cifs"
    folder.mkdir()
    for n, structure in enumerate(structures):
        structure.to(filename=str(folder / f"s{n}.cif"))
    (folder / "README.md").write_text("not a structure")
    return folder, structures


def run(*args) -> int:
    return main(["predict", *map(str, args), "--quiet", "--no-progress"])


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("tlmat: error: ")
    return lines[0]


def test_predict_on_written_cifs_equals_the_models_forward(tmp_path, crystals):
    folder, structures = crystals
    model = write_checkpoint(tmp_path / "run" / "model.pt")
    out = tmp_path / "predictions.csv"
    assert run("--model", tmp_path / "run", "--structures", folder, "--out", out) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["id", "formula", "prediction"]
    assert list(frame["id"]) == [f"s{n}" for n in range(6)]
    assert list(frame["formula"]) == [s.composition.reduced_formula for s in structures]
    np.testing.assert_allclose(frame["prediction"], forward(model, structures), atol=1e-4)


def test_a_study_cell_predicts_with_every_trial_and_reports_the_spread(tmp_path, crystals):
    folder, structures = crystals
    cell = tmp_path / "results" / "runs" / "scratch" / "aa-20"
    models = [write_checkpoint(cell / f"t{k}" / "model.pt", seed=k) for k in (1, 2, 10)]
    (cell / "t3").mkdir()  # an unfinished trial: no model.pt yet
    out = tmp_path / "p.csv"
    results = f"results_dir={tmp_path / 'results'}"
    assert run("-m", "scratch/aa-20", "-s", folder, "-o", out, "--set", results) == 0
    frame = pd.read_csv(out)
    each = np.stack([forward(m, structures) for m in models])
    np.testing.assert_allclose(frame["prediction"], each.mean(0), atol=1e-4)
    np.testing.assert_allclose(frame["prediction_std"], each.std(0, ddof=1), atol=1e-4)
    trials = ["prediction_t1", "prediction_t2", "prediction_t10"]
    assert [c for c in frame.columns if c.startswith("prediction_t")] == trials
    np.testing.assert_allclose(frame["prediction_t10"], each[2], atol=1e-4)


def test_poscar_files_and_matminer_frames_are_read_too(tmp_path, crystals):
    _, structures = crystals
    model = write_checkpoint(tmp_path / "model.pt")
    structures[0].to(filename=str(tmp_path / "POSCAR"))
    frame = pd.DataFrame({"structure": structures[1:]}, index=pd.Index(range(100, 105)))
    write_frame(frame, tmp_path / "new.json.gz")
    out = tmp_path / "p.csv"
    inputs = [tmp_path / "POSCAR", tmp_path / "new.json.gz"]
    assert run("-m", tmp_path / "model.pt", "-s", *inputs, "-o", out) == 0
    result = pd.read_csv(out, dtype={"id": str})
    assert list(result["id"]) == ["POSCAR", "100", "101", "102", "103", "104"]
    np.testing.assert_allclose(result["prediction"], forward(model, structures), atol=1e-4)


def overlapping() -> Structure:
    return Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])


def disordered() -> Structure:
    return Structure(Lattice.cubic(4.0), [{"Na": 0.5, "K": 0.5}, "Cl"], [[0, 0, 0], [0.5] * 3])


BAD_FILES = {
    "garbage.cif": ("this is not a CIF\n", "unparsable CIF"),
    "empty.cif": ("", "unparsable CIF"),
    "close.cif": (overlapping, "atoms closer than 0.5"),
    "mixed.cif": (disordered, "disordered structure"),
    "broken.vasp": ("Na\n1.0\n4 0 0\n", "unparsable structure file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_structure_is_one_line_naming_the_file_unless_skipped(
    tmp_path, crystals, capsys, name
):
    folder, structures = crystals
    content, why = BAD_FILES[name]
    if callable(content):
        content().to(filename=str(folder / name))
    else:
        (folder / name).write_text(content)
    model = write_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "p.csv"
    assert run("-m", tmp_path / "model.pt", "-s", folder, "-o", out) == 2
    line = error_line(capsys)
    assert str(folder / name) in line and why in line and "--skip-bad" in line
    assert not out.exists()  # nothing written

    assert run("-m", tmp_path / "model.pt", "-s", folder, "-o", out, "--skip-bad") == 0
    frame = pd.read_csv(out)
    assert list(frame["id"]) == [f"s{n}" for n in range(6)]
    np.testing.assert_allclose(frame["prediction"], forward(model, structures), atol=1e-4)


def test_a_bad_record_of_a_frame_names_the_frame_and_id(tmp_path, capsys):
    write_checkpoint(tmp_path / "model.pt")
    frame = pd.DataFrame({"structure": [overlapping(), *make_structures(2)]}, index=[7, 8, 9])
    write_frame(frame, tmp_path / "new.json.gz")
    assert run("-m", tmp_path / "model.pt", "-s", tmp_path / "new.json.gz") == 2
    assert f"{tmp_path / 'new.json.gz'}: id 7: atoms closer than" in error_line(capsys)


INPUT_ERRORS = {
    "missing": (lambda t: t / "nowhere", "no such file or folder"),
    "empty folder": (lambda t: t / "empty", "no structure files"),
    "frame without structures": (lambda t: t / "bad.json.gz", "a frame needs columns"),
}


@pytest.mark.parametrize("case", sorted(INPUT_ERRORS))
def test_unusable_inputs_are_one_line(tmp_path, capsys, case):
    write_checkpoint(tmp_path / "model.pt")
    (tmp_path / "empty").mkdir()
    write_frame(pd.DataFrame({"x": [1.0]}), tmp_path / "bad.json.gz")
    source, why = INPUT_ERRORS[case]
    out = tmp_path / "p.csv"
    assert run("-m", tmp_path / "model.pt", "-s", source(tmp_path), "-o", out) == 2
    assert why in error_line(capsys)
    assert not out.exists()


def test_nothing_readable_is_an_error_even_when_skipping(tmp_path, capsys):
    write_checkpoint(tmp_path / "model.pt")
    (tmp_path / "a.cif").write_text("junk")
    assert run("-m", tmp_path / "model.pt", "-s", tmp_path / "a.cif", "--skip-bad") == 2
    assert "no structure could be read" in error_line(capsys)


MODEL_ERRORS = {
    "no checkpoint": ([], "no such checkpoint, run directory or study cell"),
    "empty cell": (["cell"], "nor in trial folders"),
    "not a checkpoint": (["junk.pt"], "not a readable tlmat checkpoint"),
    "several heads": (["multi.pt"], "choose one with --head"),
    "unknown head": (["multi.pt", "--head", "cc"], "no head 'cc'"),
}


@pytest.mark.parametrize("case", sorted(MODEL_ERRORS))
def test_unusable_models_are_one_line(tmp_path, crystals, capsys, case):
    folder, _ = crystals
    (tmp_path / "cell" / "t1").mkdir(parents=True)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    write_checkpoint(tmp_path / "multi.pt", heads=("aa", "bb"))
    args, why = MODEL_ERRORS[case]
    model = tmp_path / (args[0] if args else "nothing")
    assert run("-m", model, *args[1:], "-s", folder, "-o", tmp_path / "p.csv") == 2
    line = error_line(capsys)
    assert str(model) in line and why in line
    assert not (tmp_path / "p.csv").exists()


def test_a_head_of_a_multi_head_model_can_be_chosen(tmp_path, crystals):
    folder, structures = crystals
    model = write_checkpoint(tmp_path / "multi.pt", heads=("aa", "bb"))
    out = tmp_path / "p.csv"
    assert run("-m", tmp_path / "multi.pt", "--head", "bb", "-s", folder, "-o", out) == 0
    expected = forward(model, structures, head="bb")
    np.testing.assert_allclose(pd.read_csv(out)["prediction"], expected, atol=1e-4)


def test_predict_on_a_chgnet_checkpoint_builds_chgnets_graphs(tmp_path, crystals):
    """A fine-tuned CHGNet (model.arch chgnet) predicts from CHGNet's own graphs, built with
    its model's cut-offs; the featurizer stored beside it (tlmat's) is not used."""
    pytest.importorskip("chgnet", reason="model.arch chgnet needs the chgnet package")
    from tlmat.models import chgnet_graphs as cg

    folder, structures = crystals
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="chgnet", heads=("aa",))).eval()
    save_checkpoint(tmp_path / "model.pt", model, SETTINGS, {"aa": SCALER}, "chgnet-ft", [])
    settings = cg.CHGNetGraphSettings.from_model_config(model.config)
    n = len(structures)
    graphs = cg.featurize_chgnet(structures, range(n), [0.0] * n, settings, False).graphs(range(n))
    with torch.inference_mode():
        want = SCALER.inverse(model(Batch.from_data_list(graphs), heads=["aa"])["aa"]).double()
    assert run("-m", tmp_path / "model.pt", "-s", folder, "-o", tmp_path / "p.csv") == 0
    got = pd.read_csv(tmp_path / "p.csv")
    assert list(got["id"]) == [f"s{k}" for k in range(n)]
    np.testing.assert_allclose(got["prediction"], want.numpy(), rtol=1e-5, atol=1e-5)
