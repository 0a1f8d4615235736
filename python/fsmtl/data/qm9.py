"""QM9 (Ramakrishnan et al., Scientific Data 2014) as the 11-target multi-task regression benchmark
of Nash-MTL, FAMO, FairGrad, Aligned-MTL and LibMTL, read offline from the ``qm9pack`` wheel.

Source: the four CSV files that the PyPI package ``qm9pack`` (MIT licence, by QM9's creator) ships
as package data: 130,831 molecules (the 3,054 "uncharacterized" ones already removed) with their
SMILES, element lists, Cartesian coordinates in Angstrom and every computed property (total energies
in Hartree). The files are read as package data (``importlib.metadata``), never by importing the
package, whose ``import`` needs ``pkg_resources``. Five coordinate strings write a zero as ``0.``;
numbers are parsed one by one with ``float``, which reads that form.

Featurisation, as PyTorch Geometric's ``QM9`` dataset:

* atoms in the order of the XYZ coordinates; 11 features per atom: one-hot H, C, N, O, F, the
  atomic number, aromatic, sp, sp2, sp3 and the number of bonded hydrogens. PyG reads its SDF file
  without sanitising, so its aromatic and hybridisation columns are all zero; they are zero here too.
* bonds from the SMILES, mapped onto the XYZ atom order by RDKit (connectivity from the
  coordinates, then the SMILES graph with explicit hydrogens matched onto it, element by element);
  bond types single, double, triple, aromatic as in PyG, from the Kekule form (so the aromatic type
  does not occur). A molecule whose SMILES graph does not match its geometry's connectivity is left
  out (its source row is listed under ``"left out"`` in the benchmark's ``sources``).
* the 11 targets at PyG indices 0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11 in PyG's units
  (:data:`TARGETS`): orbital energies and zero-point energy from Hartree to eV
  (``HAR2EV = 27.211386246``), the atomisation energies U0, U, H, G as the total energy in eV
  minus PyG's per-element reference energies (:data:`ATOM_REFS`).

The featurisation is cached (:func:`cache_path`): one file per source fingerprint (the
``qm9pack`` version, the SHA-256 of every CSV from the wheel's RECORD, or of the files of a local
``source``, and the featuriser's version), holding every molecule featurised so far; a load checks
the fingerprint stored in the file and featurises again on a mismatch. A run featurises only the
molecules its split needs (about 1 ms each), so the small CPU setting never pays for all of QM9.

Split: a seeded permutation of all molecules; the first ``n_test`` molecules that featurise are the
test set, the next ``n_val`` the validation set, the next ``n_train`` the training set. Targets are
standardised with the training set's mean and standard deviation (as Nash-MTL's
``scale_target``); each task records that scale and the factor to its published unit
(:class:`QM9Task`), so the metrics report the MAE in published units (energies in meV).

Inputs: one float32 tensor ``[n, 29, 43]`` per split (29 = the largest QM9 molecule): per atom row,
the 11 features, the 3 coordinates (Angstrom) and 29 bond codes to the other atoms (0 none,
1 single, 2 double, 3 triple, 4 aromatic); rows past the molecule's atoms are zero (atomic number 0).
:class:`fsmtl.models.mpnn.MPNNTrunk` builds the graph from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write_bytes
from ..tasks import Task
from .benchmark import Benchmark
from .split import Split

#: The largest molecule of QM9 (atoms, hydrogens included).
MAX_ATOMS = 29
#: Atom types of the one-hot columns, as PyG's ``types``.
ATOM_TYPES = {"H": 0, "C": 1, "N": 2, "O": 3, "F": 4}
ATOMIC_NUMBERS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
NUM_ATOM_FEATURES = 11
#: Columns of one atom row of the input: features, coordinates, bond codes to every atom.
FEATURE_COLUMNS = slice(0, NUM_ATOM_FEATURES)
POSITION_COLUMNS = slice(NUM_ATOM_FEATURES, NUM_ATOM_FEATURES + 3)
BOND_COLUMNS = slice(NUM_ATOM_FEATURES + 3, NUM_ATOM_FEATURES + 3 + MAX_ATOMS)
INPUT_SHAPE = (MAX_ATOMS, NUM_ATOM_FEATURES + 3 + MAX_ATOMS)
#: Column of the atomic number (0 on padding rows).
ATOMIC_NUMBER_COLUMN = 5
#: Bond codes: 0 = no bond, then PyG's bond types in order.
BOND_TYPES = ("single", "double", "triple", "aromatic")

HAR2EV = 27.211386246
#: PyG's atom reference energies (eV) of H, C, N, O, F for U0, U, H, G (PyG target indices 7-10).
ATOM_REFS = {
    "U0": (-13.61312172, -1029.86312267, -1485.30251237, -2042.61123593, -2713.48485589),
    "U": (-13.5745904, -1029.82456413, -1485.26398105, -2042.5727046, -2713.44632457),
    "H": (-13.54887564, -1029.79887659, -1485.2382935, -2042.54701705, -2713.42063702),
    "G": (-13.90303183, -1030.25891228, -1485.71166277, -2043.01812778, -2713.88796536),
}


@dataclass(frozen=True)
class Target:
    """One QM9 target: its name, PyG index, qm9pack column, PyG unit, published unit and the factor
    from the PyG unit to the published one."""

    name: str
    pyg_index: int
    column: str
    unit: str
    published_unit: str
    to_published: float


_MEV = 1000.0
#: The 11 targets in Nash-MTL's order (PyG indices 0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11).
TARGETS: tuple[Target, ...] = (
    Target("mu", 0, "Dipole_debye", "D", "D", 1.0),
    Target("alpha", 1, "Polarizability_bohr3", "a0^3", "a0^3", 1.0),
    Target("homo", 2, "HOMO_au", "eV", "meV", _MEV),
    Target("lumo", 3, "LUMO_au", "eV", "meV", _MEV),
    Target("r2", 5, "R2_bohr2", "a0^2", "a0^2", 1.0),
    Target("zpve", 6, "ZPVE_au", "eV", "meV", _MEV),
    Target("U0", 12, "InternalEnergy_0K_au", "eV", "meV", _MEV),
    Target("U", 13, "InternalEnergy_298K_au", "eV", "meV", _MEV),
    Target("H", 14, "Enthalphy_298K_au", "eV", "meV", _MEV),
    Target("G", 15, "GibbsFreeEnergy_298K_au", "eV", "meV", _MEV),
    Target("cv", 11, "Heatcapacity_Cv_cal_mol_K", "cal/mol/K", "cal/mol/K", 1.0),
)
TARGET_NAMES = tuple(t.name for t in TARGETS)

#: Single-task test MAEs in published units from Nash-MTL's code (``experiments/quantum_chemistry``),
#: the reference of the published Delta M% on QM9.
PUBLISHED_STL_MAE = {
    "mu": 0.0671,
    "alpha": 0.1814,
    "homo": 60.576,
    "lumo": 53.915,
    "r2": 0.5027,
    "zpve": 4.539,
    "U0": 58.838,
    "U": 64.244,
    "H": 63.852,
    "G": 66.223,
    "cv": 0.07212,
}

_CSV_COLUMNS = ("Index", "SMILES", "Elements", "XYZ_Ang", *(t.column for t in TARGETS))
#: Bump when the featurisation changes: caches of another version are not read.
FEATURISER_VERSION = 1
EXTRA_HINT = "pip install -e '.[qm9]' (the qm9 extra: qm9pack, rdkit, pandas)"


@dataclass(frozen=True)
class QM9Task(Task):
    """A QM9 target as a regression task on standardised values: ``scale`` is the training standard
    deviation in PyG's unit times :attr:`Target.to_published`, so ``mae * scale`` is the MAE in
    ``unit`` (the published unit)."""

    scale: float = 1.0
    unit: str = ""


class MissingExtraError(ValueError):
    """An optional package of the ``qm9`` extra is not installed."""


def _require(module: str, why: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"benchmark 'qm9' needs {module} ({why}): {EXTRA_HINT}") from None


# ------------------------------------------------------------------------------------------ source
def source_files(source: str | os.PathLike[str] | None = None) -> tuple[list[Path], str]:
    """The molecule CSV files and their fingerprint: the ``qm9pack`` wheel's ``qm9_part*.csv``
    (fingerprint from the SHA-256 in the wheel's RECORD) or, with ``source``, a directory of CSV
    files with the same columns (fingerprint from their content)."""
    if source is None:
        from importlib import metadata

        try:
            dist = metadata.distribution("qm9pack")
        except metadata.PackageNotFoundError:
            raise MissingExtraError(f"benchmark 'qm9' reads QM9 from the qm9pack package: {EXTRA_HINT}") from None
        entries = sorted(
            (f for f in dist.files or [] if re.fullmatch(r"qm9pack/data/qm9_part\d+\.csv", str(f))), key=str
        )
        if not entries:
            raise MissingExtraError(f"qm9pack {dist.version} has no qm9pack/data/qm9_part*.csv: {EXTRA_HINT}")
        paths = [Path(dist.locate_file(f)) for f in entries]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"qm9pack is installed but its data file {missing[0]} is missing; reinstall it")
        digests = [f"{f}:{f.hash.value if f.hash else p.stat().st_size}" for f, p in zip(entries, paths)]
        return paths, _digest(f"qm9pack {dist.version}", *digests)
    folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"qm9 source {folder} is not a directory of QM9 CSV files")
    paths = sorted(folder.glob("*.csv"))
    if not paths:
        raise FileNotFoundError(f"qm9 source {folder} holds no .csv file")
    return paths, _digest(*(f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in paths))


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join([f"featuriser {FEATURISER_VERSION}", *parts]).encode()).hexdigest()


def read_rows(paths: Sequence[Path]) -> dict[str, list]:
    """The columns QM9 needs from the CSV files, concatenated in file order (pandas' C reader)."""
    pd = _require("pandas", "to read the QM9 CSV files")
    frames = []
    for path in paths:
        try:
            frames.append(pd.read_csv(path, usecols=list(_CSV_COLUMNS)))
        except ValueError as exc:
            raise ValueError(f"{path}: not a QM9 CSV with columns {list(_CSV_COLUMNS)}: {exc}") from None
    frame = pd.concat(frames, ignore_index=True)
    return {c: frame[c].tolist() for c in _CSV_COLUMNS}


def parse_coordinates(text: str, where: str = "") -> np.ndarray:
    """``[[x, y, z], ...]`` (Angstrom) as a ``[n, 3]`` float64 array; reads ``0.`` (five molecules
    of the wheel write zero that way, which JSON rejects)."""
    numbers = [v for v in re.split(r"[\[\],\s]+", text) if v]
    try:
        values = np.array([float(v) for v in numbers], dtype=np.float64)
    except ValueError:
        raise ValueError(f"{where}: unreadable coordinates {text[:80]!r}") from None
    if values.size % 3:
        raise ValueError(f"{where}: {values.size} coordinate values, not a multiple of 3")
    return values.reshape(-1, 3)


def parse_elements(text: str) -> list[str]:
    """``['C','H',...]`` as a list of element symbols."""
    return re.findall(r"[A-Z][a-z]?", text)


# ----------------------------------------------------------------------------------- featurisation
def molecule_bonds(symbols: Sequence[str], coords: np.ndarray, smiles: str) -> list[tuple[int, int, int]] | None:
    """Bonds ``(i, j, code)`` (``i < j`` in the XYZ atom order, code 1-4 as :data:`BOND_TYPES`) of
    the SMILES graph mapped onto the geometry; None when they do not match."""
    _require("rdkit", "to map each SMILES onto its geometry")
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdDetermineBonds

    RDLogger.DisableLog("rdApp.*")
    n = len(symbols)
    block = f"{n}\n\n" + "\n".join(f"{s} {x:.10f} {y:.10f} {z:.10f}" for s, (x, y, z) in zip(symbols, coords))
    geometry = Chem.MolFromXYZBlock(block)
    template = Chem.MolFromSmiles(smiles)
    if geometry is None or template is None:
        return None
    template = Chem.AddHs(template)
    if template.GetNumAtoms() != n:
        return None
    try:
        rdDetermineBonds.DetermineConnectivity(geometry)
        Chem.Kekulize(template, clearAromaticFlags=True)
    except (ValueError, RuntimeError):
        return None
    # The SMILES graph as a query on connectivity alone: elements and bonds, no orders or charges.
    query = Chem.RWMol(template)
    for atom in query.GetAtoms():
        atom.SetFormalCharge(0)
        atom.SetNoImplicit(True)
        atom.SetNumExplicitHs(0)
        atom.SetChiralTag(Chem.ChiralType.CHI_UNSPECIFIED)
    for bond in query.GetBonds():
        bond.SetBondType(Chem.BondType.SINGLE)
        bond.SetStereo(Chem.BondStereo.STEREONONE)
    match = geometry.GetSubstructMatch(query.GetMol(), useChirality=False)
    if len(match) != n:
        return None
    codes = {
        Chem.BondType.SINGLE: 1,
        Chem.BondType.DOUBLE: 2,
        Chem.BondType.TRIPLE: 3,
        Chem.BondType.AROMATIC: 4,
    }
    bonds = []
    for bond in template.GetBonds():
        code = codes.get(bond.GetBondType())
        if code is None:
            return None
        i, j = match[bond.GetBeginAtomIdx()], match[bond.GetEndAtomIdx()]
        bonds.append((min(i, j), max(i, j), code))
    return sorted(bonds)


def pyg_targets(symbols: Sequence[str], row: dict) -> np.ndarray:
    """The 11 targets of one molecule in PyG's units (:data:`TARGETS`), from its qm9pack row."""
    types = [ATOM_TYPES[s] for s in symbols]
    out = []
    for target in TARGETS:
        value = float(row[target.column])
        if target.name in ATOM_REFS:
            value = value * HAR2EV - sum(ATOM_REFS[target.name][k] for k in types)
        elif target.unit == "eV":
            value *= HAR2EV
        out.append(value)
    return np.array(out, dtype=np.float64)


def atom_features(z: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    """PyG's 11 atom features ``[n, 11]`` from atomic numbers ``[n]`` and bonds ``[B, 3]``."""
    n = len(z)
    x = np.zeros((n, NUM_ATOM_FEATURES), dtype=np.float32)
    order = {v: ATOM_TYPES[k] for k, v in ATOMIC_NUMBERS.items()}
    x[np.arange(n), [order[int(v)] for v in z]] = 1.0
    x[:, ATOMIC_NUMBER_COLUMN] = z
    # columns 6-9: aromatic, sp, sp2, sp3 stay 0 (PyG reads its SDF unsanitised); 10: bonded hydrogens.
    for i, j, _ in bonds:
        x[i, 10] += z[j] == 1
        x[j, 10] += z[i] == 1
    return x


@dataclass
class Featurised:
    """Featurised molecules (flat arrays, molecule ``m`` owns atoms ``atom_start[m]:atom_start[m+1]``
    and bonds likewise), plus the rows that failed. ``rows`` are positions in the source's row order."""

    rows: np.ndarray  # int64 [M]
    qm9_index: np.ndarray  # int64 [M], QM9's molecule number
    atom_start: np.ndarray  # int64 [M + 1]
    z: np.ndarray  # int8 [A]
    pos: np.ndarray  # float32 [A, 3]
    bond_start: np.ndarray  # int64 [M + 1]
    bonds: np.ndarray  # int16 [B, 3]
    targets: np.ndarray  # float64 [M, 11]
    failed: np.ndarray  # int64 [F] rows that could not be featurised
    total_rows: int

    @classmethod
    def empty(cls, total_rows: int) -> Featurised:
        zero = np.zeros(1, dtype=np.int64)
        return cls(
            np.zeros(0, np.int64), np.zeros(0, np.int64), zero, np.zeros(0, np.int8), np.zeros((0, 3), np.float32),
            zero.copy(), np.zeros((0, 3), np.int16), np.zeros((0, len(TARGETS))), np.zeros(0, np.int64), total_rows,
        )  # fmt: skip

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}

    def extend(self, molecules: list[tuple], failed: Iterable[int]) -> Featurised:
        """A new record with ``molecules`` (``(row, index, z, pos, bonds, targets)``) and ``failed`` added."""
        if not molecules:
            return Featurised(**{**vars(self), "failed": np.union1d(self.failed, list(failed)).astype(np.int64)})
        rows, index, zs, poss, bondss, ys = zip(*molecules)
        atom_counts = np.array([len(z) for z in zs])
        bond_counts = np.array([len(b) for b in bondss])
        return Featurised(
            rows=np.concatenate([self.rows, rows]).astype(np.int64),
            qm9_index=np.concatenate([self.qm9_index, index]).astype(np.int64),
            atom_start=np.concatenate([self.atom_start, self.atom_start[-1] + np.cumsum(atom_counts)]),
            z=np.concatenate([self.z, *zs]).astype(np.int8),
            pos=np.concatenate([self.pos, *poss]).astype(np.float32),
            bond_start=np.concatenate([self.bond_start, self.bond_start[-1] + np.cumsum(bond_counts)]),
            bonds=np.concatenate([self.bonds, *[np.asarray(b, np.int16).reshape(-1, 3) for b in bondss]]),
            targets=np.concatenate([self.targets, np.stack(ys)]),
            failed=np.union1d(self.failed, list(failed)).astype(np.int64),
            total_rows=self.total_rows,
        )


def featurise_rows(columns: dict[str, list], rows: Iterable[int]) -> tuple[list[tuple], list[int]]:
    """Featurise the given source rows: ``(molecules, failed rows)`` as :meth:`Featurised.extend` takes."""
    molecules, failed = [], []
    for r in rows:
        where = f"QM9 molecule {columns['Index'][r]}"
        symbols = parse_elements(columns["Elements"][r])
        coords = parse_coordinates(columns["XYZ_Ang"][r], where)
        if len(symbols) != len(coords) or not 0 < len(symbols) <= MAX_ATOMS:
            raise ValueError(f"{where}: {len(symbols)} elements but {len(coords)} coordinates")
        unknown = sorted(set(symbols) - set(ATOM_TYPES))
        if unknown:
            raise ValueError(f"{where}: elements {unknown} outside H, C, N, O, F")
        bonds = molecule_bonds(symbols, coords, columns["SMILES"][r])
        if bonds is None:
            failed.append(r)
            continue
        z = np.array([ATOMIC_NUMBERS[s] for s in symbols], dtype=np.int8)
        row = {c: columns[c][r] for c in columns}
        molecules.append((r, int(columns["Index"][r]), z, coords, bonds, pyg_targets(symbols, row)))
    return molecules, failed


# -------------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """``$FSMTL_CACHE``, else ``$XDG_CACHE_HOME/fsmtl``, else ``~/.cache/fsmtl``."""
    if os.environ.get("FSMTL_CACHE"):
        return Path(os.environ["FSMTL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fsmtl"


def cache_path(fingerprint: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"qm9-{fingerprint[:16]}.npz"


def load_cache(path: Path, fingerprint: str) -> Featurised | None:
    """The cached featurisation, or None when absent or written for another fingerprint (then a
    warning says it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = str(data["fingerprint"])
            if stored != fingerprint:
                warnings.warn(
                    f"QM9 cache {path} was written for another source or featuriser (fingerprint {stored[:16]}, "
                    f"expected {fingerprint[:16]}); featurising again",
                    UserWarning,
                    stacklevel=3,
                )
                return None
            fields = {k: data[k] for k in data.files if k not in ("fingerprint", "total_rows")}
            return Featurised(**fields, total_rows=int(data["total_rows"]))
    except (OSError, ValueError, KeyError) as exc:
        warnings.warn(f"QM9 cache {path} is unreadable ({exc}); featurising again", UserWarning, stacklevel=3)
        return None


def save_cache(path: Path, fingerprint: str, data: Featurised) -> None:
    def write(f) -> None:
        np.savez(f, fingerprint=np.array(fingerprint), total_rows=np.array(data.total_rows), **data.arrays())

    atomic_write_bytes(path, write)


# -------------------------------------------------------------------------------------------- split
def _split_rows(total: int, needed: int, seed: int, known: Featurised, featurise) -> tuple[list[int], Featurised]:
    """The first ``needed`` rows of a seeded permutation that featurise, featurising missing ones."""
    order = np.random.default_rng(seed).permutation(total)
    have = set(known.rows.tolist())
    bad = set(known.failed.tolist())
    chosen: list[int] = []
    start = 0
    while len(chosen) < needed and start < total:
        window = order[start : start + (needed - len(chosen))]
        start += len(window)
        missing = [int(r) for r in window if r not in have and r not in bad]
        if missing:
            known = featurise(known, missing)
            have = set(known.rows.tolist())
            bad = set(known.failed.tolist())
        chosen += [int(r) for r in window if r in have]
    if len(chosen) < needed:
        raise ValueError(f"QM9 source has {len(chosen)} usable molecules, the split needs {needed}")
    return chosen, known


def pack_molecules(data: Featurised, rows: Sequence[int]) -> torch.Tensor:
    """The input tensor ``[n, 29, 43]`` (:data:`INPUT_SHAPE`) of the given source rows."""
    where = {int(r): m for m, r in enumerate(data.rows.tolist())}
    out = np.zeros((len(rows), *INPUT_SHAPE), dtype=np.float32)
    for k, r in enumerate(rows):
        m = where[int(r)]
        a0, a1 = data.atom_start[m], data.atom_start[m + 1]
        z = data.z[a0:a1].astype(np.int64)
        bonds = data.bonds[data.bond_start[m] : data.bond_start[m + 1]].astype(np.int64)
        n = len(z)
        out[k, :n, FEATURE_COLUMNS] = atom_features(z, bonds)
        out[k, :n, POSITION_COLUMNS] = data.pos[a0:a1]
        codes = out[k, :, BOND_COLUMNS]
        codes[bonds[:, 0], bonds[:, 1]] = bonds[:, 2]
        codes[bonds[:, 1], bonds[:, 0]] = bonds[:, 2]
    return torch.from_numpy(out)


def qm9(
    *,
    seed: int = 0,
    n_train: int = 500,
    n_val: int = 250,
    n_test: int = 500,
    source: str | None = None,
    cache_dir: str | None = None,
    targets: str | Sequence[str] | None = None,
) -> Benchmark:
    """QM9's 11 regression targets over one molecule (homogeneous), Nash-MTL's setting.

    Args:
        seed: the split's permutation of all molecules.
        n_train, n_val, n_test: split sizes (the published protocol: 110000, 10000, 10000).
        source: a directory of CSV files in qm9pack's layout (default: the installed ``qm9pack``).
        cache_dir: where the featurisation is cached (default :func:`default_cache_dir`).
        targets: a subset of :data:`TARGET_NAMES` (a list or comma-separated text) as the tasks,
            in that order (default: all 11).

    Returns:
        a :class:`Benchmark` named ``qm9`` with inputs ``[n, 29, 43]`` (see the module docstring),
        :class:`QM9Task` tasks of kind ``regression`` and standardised float32 targets ``[n]``.
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    names = list(TARGET_NAMES) if targets is None else targets
    names = [n for n in names.split(",") if n] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in TARGET_NAMES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"targets must be distinct names of {list(TARGET_NAMES)}, got {names}")
    keep = [TARGET_NAMES.index(n) for n in names]
    paths, fingerprint = source_files(source)
    path = cache_path(fingerprint, cache_dir)
    known = load_cache(path, fingerprint)
    columns: dict[str, list] = {}

    def source_columns() -> dict[str, list]:
        if not columns:
            columns.update(read_rows(paths))
        return columns

    if known is None:
        known = Featurised.empty(len(source_columns()["Index"]))
    changed = []

    def featurise(data: Featurised, rows: list[int]) -> Featurised:
        molecules, failed = featurise_rows(source_columns(), rows)
        changed.append(len(rows))
        return data.extend(molecules, failed)

    needed = n_test + n_val + n_train
    chosen, known = _split_rows(known.total_rows, needed, seed, known, featurise)
    if changed:
        save_cache(path, fingerprint, known)
    test_rows, val_rows, train_rows = chosen[:n_test], chosen[n_test : n_test + n_val], chosen[n_test + n_val :]
    position = {int(r): m for m, r in enumerate(known.rows.tolist())}

    def values(rows: Sequence[int]) -> np.ndarray:
        return known.targets[[position[r] for r in rows]]

    y_train = values(train_rows)
    mean = y_train.mean(axis=0)
    std = y_train.std(axis=0, ddof=0) if len(train_rows) > 1 else np.ones(len(TARGETS))
    std = np.where(std > 0, std, 1.0)
    tasks = [
        QM9Task(TARGETS[k].name, "regression", 1, scale=float(std[k] * TARGETS[k].to_published),
                unit=TARGETS[k].published_unit)
        for k in keep
    ]  # fmt: skip

    def split(rows: Sequence[int]) -> Split:
        x = pack_molecules(known, rows)
        y = torch.from_numpy(((values(rows) - mean) / std).astype(np.float32))
        return Split(inputs=[x] * len(keep), targets=[y[:, k].contiguous() for k in keep])

    described = f"{source or 'the qm9pack package'} ({len(paths)} CSV files)"
    return Benchmark(
        name="qm9",
        tasks=tasks,
        homogeneous=True,
        input_shape=INPUT_SHAPE,
        train=split(train_rows),
        val=split(val_rows),
        test=split(test_rows),
        sources={
            "*": described,
            "cache": str(path),
            "left out": f"source rows {json.dumps(known.failed.tolist())}: SMILES graph and geometry disagree",
        },
    )


#: ``fsmtl run --benchmark qm9``'s settings (the ``qm9`` preset): a subset on the bonded graph sized
#: so that ``--methods stl,mtl,rs,fs`` finishes within 30 minutes on 2 CPU cores.
QM9_CPU_SETTINGS = {
    "benchmark_options": {"n_train": 500, "n_val": 250, "n_test": 500},
    "model": "mpnn",
    "batch_size": 120,
    "lr": 1e-3,
    "epochs": 3,
    "keep_ratios": (0.5,),
    "warmup": 1,
    "update_every": 1,
    "samples": 120,
}
