"""Out-of-domain JARVIS records and external checkpoints (chains run in test_workflow.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import run_snakemake, synthetic_data_dir, tiny_config
from jarvis.core.atoms import Atoms
from pymatgen.core import Lattice, Structure
from pymatgen.io.jarvis import JarvisAtomsAdaptor

from tlmat.checkpoint import CheckpointError
from tlmat.data import clean, jarvis_frame
from tlmat.runs import RunSpec, execute_run
from tlmat.transfer import StrategyError

ROOT = Path(__file__).parents[1]
CGCNN = "model={arch: cgcnn, hidden: 16, gcn_layers: 1}"
AABB = "study={datasets: [aa, bb]}"

# three records in the format of jarvis.db.figshare.data("dft_2d")
RECORDS = [
    {
        "jid": "JVASP-664",
        "optb88vdw_bandgap": 1.59,
        "atoms": {
            "lattice_mat": [[3.19, 0.0, 0.0], [-1.595, 2.7626, 0.0], [0.0, 0.0, 35.0]],
            "coords": [[0.0, 0.0, 0.5], [0.3333, 0.6667, 0.5447], [0.3333, 0.6667, 0.4553]],
            "elements": ["Mo", "S", "S"],
            "abc": [3.19, 3.19, 35.0],
            "angles": [90.0, 90.0, 120.0],
            "cartesian": False,
            "props": ["", "", ""],
        },
    },
    {
        "jid": "JVASP-76195",
        "optb88vdw_bandgap": 0.0,
        "atoms": {
            "lattice_mat": [[2.46, 0.0, 0.0], [-1.23, 2.1304, 0.0], [0.0, 0.0, 20.0]],
            "coords": [[0.0, 0.0, 10.0], [1.23, 0.7101, 10.0]],  # Cartesian Å
            "elements": ["C", "C"],
            "abc": [2.46, 2.46, 20.0],
            "angles": [90.0, 90.0, 120.0],
            "cartesian": True,
            "props": ["", ""],
        },
    },
    {
        "jid": "JVASP-6955",
        "optb88vdw_bandgap": "na",  # JARVIS writes missing values as "na"
        "atoms": {
            "lattice_mat": [[3.6, 0.0, 0.0], [0.0, 3.6, 0.0], [0.0, 0.0, 25.0]],
            "coords": [[0.0, 0.0, 0.5], [0.5, 0.5, 0.5]],
            "elements": ["Ti", "O"],
            "abc": [3.6, 3.6, 25.0],
            "angles": [90.0, 90.0, 90.0],
            "cartesian": False,
            "props": ["", ""],
        },
    },
]


def test_jarvis_records_convert_like_pymatgens_jarvis_adaptor():
    frame = jarvis_frame(RECORDS, "optb88vdw_bandgap", "jarvis2d")
    assert list(frame.index) == [664, 76195, 6955]
    for record, structure in zip(RECORDS, frame["structure"], strict=True):
        reference = JarvisAtomsAdaptor.get_structure(Atoms.from_dict(record["atoms"]))
        assert structure == reference
        atoms = record["atoms"]
        by_hand = Structure(
            Lattice(atoms["lattice_mat"]),
            atoms["elements"],
            atoms["coords"],
            coords_are_cartesian=atoms["cartesian"],
        )
        np.testing.assert_allclose(structure.lattice.matrix, by_hand.lattice.matrix)
        np.testing.assert_allclose(structure.cart_coords, by_hand.cart_coords, atol=1e-8)
        assert [str(s) for s in structure.species] == atoms["elements"]
    kept, counts = clean(frame, "jarvis2d", drop_bad_records=True)
    assert counts["non_finite_target"] == 1 and list(kept.index) == [664, 76195]
    assert kept.loc[664, "target"] == pytest.approx(1.59)


def test_jarvis_records_without_the_target_field_are_a_clear_error():
    with pytest.raises(ValueError, match="datasets.jarvis2d: JARVIS records have no field"):
        jarvis_frame(RECORDS, "mbj_bandgap", "jarvis2d")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    synthetic_data_dir(root, {"aa": 40, "bb": 40})
    config = tiny_config(root, ["aa", "bb"], CGCNN, "train.epochs=1", AABB)
    spec = RunSpec("pt/aa-30/t1", "aa", 30, 1, root / "published", kind="pretrain")
    execute_run(config, spec)
    return root, config, root / "published" / "model.pt"


def test_a_chain_stage_fine_tunes_an_external_checkpoint(workspace):
    root, config, checkpoint = workspace
    spec = RunSpec(
        "chain/ext_pub.bb-20/t1",
        "bb",
        20,
        1,
        root / "stage",
        kind="chain",
        checkpoint=checkpoint,
        strategy="full",
    )
    metrics = execute_run(config, spec)
    assert metrics["kind"] == "chain" and metrics["chain"] == "aa:30>bb:20"
    assert metrics["pt_dataset"] == "aa"


def test_external_checkpoint_of_another_architecture_is_refused(workspace):
    root, _, checkpoint = workspace
    alignn = tiny_config(root, ["aa", "bb"], "train.epochs=1")
    spec = RunSpec("x/t1", "bb", 20, 1, root / "bad-arch", checkpoint=checkpoint, strategy="full")
    with pytest.raises(
        CheckpointError, match=r"model\.pt: a cgcnn model, but this study trains alignn"
    ):
        execute_run(alignn, spec)
    assert not (root / "bad-arch" / "metrics.json").exists()


def test_external_checkpoint_whose_heads_do_not_fit_the_strategy_is_refused(workspace):
    root, config, _ = workspace
    from tlmat.mpt import MPTSpec, execute_mpt

    execute_mpt(config, MPTSpec("all", 30, 1, root / "multi", "mpt/all-30/pt/t1"))
    multi = root / "multi" / "model.pt"
    # a three-head model has no head for "cc": reusing one is ambiguous
    config3 = tiny_config(root, ["aa", "bb", "cc"], CGCNN, "train.epochs=1", AABB)
    synthetic_data_dir(root, {"aa": 40, "bb": 40, "cc": 40})
    spec = RunSpec("x/t1", "cc", 20, 1, root / "bad-head", checkpoint=multi, strategy="full")
    with pytest.raises(StrategyError, match=r"multi/model\.pt: strategy 'full' reuses"):
        execute_run(config3, spec)


def test_a_chain_naming_an_unknown_external_checkpoint_fails_at_dag_build(tmp_path):
    synthetic_data_dir(tmp_path, {"aa": 30, "bb": 30})
    study = {
        "data_dir": "data",
        "datasets": {k: {"source": "file"} for k in ("aa", "bb")},
        "external_checkpoints": {"pub": str(tmp_path / "missing.pt")},
        "study": {"datasets": ["aa", "bb"], "chains": [{"stages": ["ext:pub", "bb:20"]}]},
    }
    (tmp_path / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(study))
    result = run_snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert "external_checkpoints.pub: file" in result.stdout + result.stderr


def test_the_chain_table_sets_a_chain_beside_its_one_stage_transfer():
    import pandas as pd

    from tlmat.report.runs import StudyDefaults
    from tlmat.report.tables import chains_table

    def run(kind, chain, trial, r2, mae, pt=("aa", 30)):
        return {
            "run_id": f"{kind}/{chain}/t{trial}",
            "kind": kind,
            "model": "cgcnn",
            "dataset": "cc",
            "size": 20,
            "trial": trial,
            "chain": chain,
            "pt_dataset": pt[0] if pt else None,
            "pt_size": pt[1] if pt else None,
            "strategy": "full" if pt else None,
            "lr": 0.001,
            "test_r2": r2,
            "test_mae": mae,
            "test_mape": 0.1,
        }

    runs = pd.DataFrame(
        [
            run("scratch", "cc:20", 1, 0.1, 1.0, pt=None),
            run("scratch", "cc:20", 2, 0.2, 1.0, pt=None),
            run("chain", "aa:30>bb:20>cc:20", 1, 0.6, 0.5, pt=("bb", 20)),
            run("chain", "aa:30>bb:20>cc:20", 2, 0.7, 0.6, pt=("bb", 20)),
            run("finetune", "aa:30>cc:20", 1, 0.4, 0.8),
            run("finetune", "aa:30>cc:20", 2, 0.5, 0.7),
        ]
    )
    row = chains_table(runs, StudyDefaults(pt_size=30, lr=0.001)).iloc[0]
    assert row["chain"] == "aa:30>bb:20>cc:20" and row["n_stages"] == 2
    assert (row["one_stage_chain"], row["one_stage_n"]) == ("aa:30>cc:20", 2)
    assert row["one_stage_mae_mean"] == pytest.approx(0.75)
    assert row["gain_mae_vs_one_stage"] == pytest.approx((0.75 - 0.55) / 0.75 * 100)
    assert row["gain_mae"] == pytest.approx((1.0 - 0.55) / 1.0 * 100)
