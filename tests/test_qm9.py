"""QM9: reading, featurisation (PyG's features and units, checked by hand on small molecules),
the cached featurisation, the seeded split and the error without the extra. The molecules come
from a 53-molecule fixture in qm9pack's CSV layout; one test reads the installed wheel."""

import importlib.metadata
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fsmtl.data import load_benchmark
from fsmtl.data import qm9 as q
from fsmtl.run.cli import main

pytest.importorskip("rdkit")
pytest.importorskip("pandas")

FIXTURE = str(Path(__file__).parent / "fixtures" / "qm9")
HAR2EV = 27.211386246


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("qm9-cache"))


@pytest.fixture(scope="module")
def bench(cache):
    return load_benchmark("qm9", n_train=30, n_val=8, n_test=10, source=FIXTURE, cache_dir=cache)


def _row(columns, index):
    r = columns["Index"].index(index)
    return r, {c: columns[c][r] for c in columns}


def test_methane_by_hand():
    columns = q.read_rows([Path(FIXTURE) / "qm9_part1.csv"])
    r, row = _row(columns, 1)
    molecules, failed = q.featurise_rows(columns, [r])
    assert failed == []
    _, index, z, pos, bonds, y = molecules[0]
    assert index == 1 and z.tolist() == [6, 1, 1, 1, 1]  # C first, as in the XYZ file
    assert bonds == [(0, 1, 1), (0, 2, 1), (0, 3, 1), (0, 4, 1)]  # 4 single C-H bonds
    assert row["InternalEnergy_0K_au"] == -40.47893
    u0_ev = -40.47893 * HAR2EV
    atomisation = u0_ev - (4 * -13.61312172 + -1029.86312267)  # PyG's H and C references for U0
    expected = dict(zip(q.TARGET_NAMES, y))
    assert expected["U0"] == pytest.approx(atomisation, abs=1e-9)
    assert expected["U0"] == pytest.approx(-17.17219, abs=1e-5)  # PyG's U0_atom of methane (eV)
    assert expected["homo"] == pytest.approx(-0.3877 * HAR2EV) and expected["lumo"] == pytest.approx(0.1171 * HAR2EV)
    assert expected["zpve"] == pytest.approx(0.044749 * HAR2EV)
    assert (expected["mu"], expected["alpha"], expected["r2"], expected["cv"]) == (0.0, 13.21, 35.3641, 6.469)
    x = q.atom_features(z.astype(np.int64), np.array(bonds))
    # one-hot H C N O F, atomic number, aromatic, sp, sp2, sp3 (all zero as PyG's), bonded hydrogens
    assert x[0].tolist() == [0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 4]
    assert x[1].tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]


def test_water_ammonia_and_double_bonds_by_hand():
    columns = q.read_rows([Path(FIXTURE) / "qm9_part1.csv"])
    rows = [_row(columns, i)[0] for i in (2, 3, 4)]
    molecules, _ = q.featurise_rows(columns, rows)
    (_, _, z_n, _, b_n, _), (_, _, z_o, _, b_o, _), (_, _, z_c2h2, pos, b_c2h2, _) = molecules
    assert z_n.tolist() == [7, 1, 1, 1] and len(b_n) == 3
    assert z_o.tolist() == [8, 1, 1] and b_o == [(0, 1, 1), (0, 2, 1)]
    # molecule 4 is acetylene, whose coordinates write zero as "0." (JSON would reject them)
    assert z_c2h2.tolist() == [6, 6, 1, 1] and (0, 1, 3) in b_c2h2  # the C#C triple bond
    assert pos[0].tolist() == [0.5995394918, 0.0, 1.0]


def test_coordinates_with_bare_decimal_points_parse():
    xyz = q.parse_coordinates("[[0.5995394918,0.,1.],[-0.5995394918,0.,1.]]")
    assert xyz.tolist() == [[0.5995394918, 0.0, 1.0], [-0.5995394918, 0.0, 1.0]]
    with pytest.raises(ValueError, match="not a multiple of 3"):
        q.parse_coordinates("[[1.,2.]]", "molecule 9")


def test_split_sizes_left_out_molecules_and_standardised_targets(bench):
    assert bench.name == "qm9" and bench.homogeneous and bench.input_shape == q.INPUT_SHAPE
    assert [t.name for t in bench.tasks] == list(q.TARGET_NAMES) and len(bench.tasks) == 11
    assert bench.train.sizes == [30] * 11 and bench.val.sizes == [8] * 11 and bench.test.sizes == [10] * 11
    sets = [{tuple(m.flatten().tolist()) for m in getattr(bench, s).inputs[0]} for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    for y in bench.train.targets:
        assert abs(float(y.mean())) < 1e-5 and float(y.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    energy = next(t for t in bench.tasks if t.name == "U0")
    assert energy.unit == "meV" and energy.scale > 1000  # training std (eV) times 1000
    assert next(t for t in bench.tasks if t.name == "mu").unit == "D"
    bench.check()


def test_failed_molecules_are_left_out_and_named(cache):
    # Every fixture molecule is needed: the two whose SMILES graph does not match the geometry
    # (QM9 133857 and 133859) are left out, so 51 of 53 remain.
    whole = load_benchmark("qm9", n_train=41, n_val=5, n_test=5, source=FIXTURE, cache_dir=cache)
    assert sum(whole.train.sizes[:1] + whole.val.sizes[:1] + whole.test.sizes[:1]) == 51
    assert "SMILES graph and geometry disagree" in whole.sources["left out"]
    with pytest.raises(ValueError, match="51 usable molecules, the split needs 52"):
        load_benchmark("qm9", n_train=42, n_val=5, n_test=5, source=FIXTURE, cache_dir=cache)


def test_a_subset_of_targets(bench, cache):
    two = load_benchmark("qm9", n_train=30, n_val=8, n_test=10, source=FIXTURE, cache_dir=cache, targets="U0,mu")
    assert [t.name for t in two.tasks] == ["U0", "mu"]
    assert torch.equal(two.train.targets[0], bench.train.targets[6]) and two.tasks[1] == bench.tasks[0]
    with pytest.raises(ValueError, match="targets must be distinct names"):
        load_benchmark("qm9", source=FIXTURE, cache_dir=cache, targets="mu,gap")


def test_split_is_seeded(bench, cache):
    again = load_benchmark("qm9", n_train=30, n_val=8, n_test=10, source=FIXTURE, cache_dir=cache)
    other = load_benchmark("qm9", seed=1, n_train=30, n_val=8, n_test=10, source=FIXTURE, cache_dir=cache)
    assert torch.equal(again.test.inputs[0], bench.test.inputs[0])
    assert not torch.equal(other.test.inputs[0], bench.test.inputs[0])


def test_cache_is_read_back_and_its_fingerprint_checked(tmp_path, monkeypatch):
    first = q.qm9(n_train=6, n_val=2, n_test=2, source=FIXTURE, cache_dir=str(tmp_path))
    (path,) = tmp_path.glob("qm9-*.npz")

    def no_featurising(*args, **kwargs):
        raise AssertionError("featurised again although the cache holds the molecules")

    monkeypatch.setattr(q, "featurise_rows", no_featurising)
    again = q.qm9(n_train=6, n_val=2, n_test=2, source=FIXTURE, cache_dir=str(tmp_path))
    assert torch.equal(first.train.inputs[0], again.train.inputs[0])
    assert all(torch.equal(a, b) for a, b in zip(first.test.targets, again.test.targets))
    monkeypatch.undo()
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["fingerprint"] = np.array("f" * 64)
    np.savez(path, **arrays)
    with pytest.warns(UserWarning, match="another source or featuriser"):
        rebuilt = q.qm9(n_train=6, n_val=2, n_test=2, source=FIXTURE, cache_dir=str(tmp_path))
    assert torch.equal(first.train.inputs[0], rebuilt.train.inputs[0])
    with np.load(path) as data:
        assert str(data["fingerprint"]) != "f" * 64


def test_packed_molecule_holds_features_coordinates_and_bond_codes(bench):
    x = bench.train.inputs[0]
    present = x[..., q.ATOMIC_NUMBER_COLUMN] > 0
    assert present.sum(1).min() >= 3 and (x[~present] == 0).all()
    codes = x[..., q.BOND_COLUMNS]
    assert torch.equal(codes, codes.transpose(1, 2)) and set(codes.unique().tolist()) <= {0, 1, 2, 3}
    hydrogens = (x[..., 0] == 1).float()
    bonded_h = ((codes > 0).float() * hydrogens.unsqueeze(1)).sum(2)
    assert torch.equal(bonded_h, x[..., 10])  # the last feature counts bonded hydrogens


def test_missing_extra_is_one_error_naming_it(monkeypatch, capsys, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(q.MissingExtraError, match=r"\.\[qm9\]"):
        q.source_files()
    code = main(["run", "--benchmark", "qm9", "--methods", "mtl", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("fsmtl: error: benchmark 'qm9' reads QM9 from the qm9pack package")
    assert "[qm9]" in err[-1]


def test_the_installed_wheel_is_read_as_package_data(tmp_path):
    try:
        importlib.metadata.distribution("qm9pack")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("qm9pack (the qm9 extra) is not installed")
    paths, fingerprint = q.source_files()
    assert [p.name for p in paths] == ["qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"] and len(fingerprint) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        real = q.qm9(n_train=8, n_val=4, n_test=4, cache_dir=str(tmp_path))
    assert real.train.sizes[0] == 8 and real.sources["*"].startswith("the qm9pack package (3 CSV files)")
    (cached,) = tmp_path.glob("qm9-*.npz")
    with np.load(cached) as data:
        assert int(data["total_rows"]) == 130831 and str(data["fingerprint"]) == fingerprint
