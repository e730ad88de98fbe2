"""Coverage and spread of combined (federated) estimates, through the real node release path.

Three trusts of different sizes are generated with the synthetic generator (disjoint person ids)
and loaded with the node loader; each runs its own ``NodeEngine``. Every query is released
``RELEASES`` times at each trust, under the same query id at the three trusts (as the coordinator
would send it), and the three answers of each round are combined with the output rules off.

The truth is the pooled exact answer: plain DuckDB on each trust's database (rows with
``_rank_<level>`` within the view's cap, as the query language defines), summed over trusts.

Expected coverage: the combined interval is value ± k with k = ``sum_halfwidth`` of the three
scales, so its coverage is exactly p* = P(|X_1 + X_2 + X_3| <= k) (independent discrete Laplace;
clipping at 0 cannot change it as every truth is positive). p* is computed here by brute-force
convolution, independently of ``fedtre.dp``. The number of covering rounds is Binomial(m, p*),
the cells of one release having independent noise; each assertion's window holds the central
1 - FALSE_FAILURE / ASSERTIONS of that distribution, so the whole file fails by chance with
probability at most FALSE_FAILURE = 0.2%.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pytest
from scipy import stats

from coordinator.combine import Combined, OutputRules, combine
from fedtre.catalog import Catalog
from fedtre.dp import sum_halfwidth
from fedtre.result import NodeResult
from fedtre.synthetic import generate
from node.config import load_node_config
from node.engine import NodeEngine
from node.loader import load_omop
from tests.conftest import request, write_node_config

RELEASES = 800
TRUSTS = (("trust-a", 1800, 101), ("trust-b", 1100, 202), ("trust-c", 600, 303))
ID_OFFSET = 10_000_000  # trust i's person ids start after i * ID_OFFSET
FALSE_FAILURE = 0.002
ASSERTIONS = 8  # coverage: 1 + 1 + 2, spread: 2 × 2 (below)

COUNT_SQL = "SELECT COUNT(*) AS n FROM patients"
COUNT_EPSILON = 0.25  # sensitivity 1: scale 4, a coarse lattice where off-by-one would show
GROUPED_SQL = (
    "SELECT condition_group, COUNT(*) AS n, COUNT(DISTINCT person_id) AS persons "
    "FROM conditions GROUP BY condition_group"
)
GROUPED_EPSILON = 0.5  # half each: COUNT(*) 25 / 0.25 = 100, COUNT(DISTINCT) 13 / 0.25 = 52


@dataclass(frozen=True)
class Federation:
    count_truth: int
    rows_truth: list[int]  # per condition group, pooled
    persons_truth: list[int]
    counts: list[Combined]  # one per round
    grouped: list[Combined]
    raw_count: list[list[NodeResult]]  # per round, the three trusts' answers
    raw_grouped: list[list[NodeResult]]


def _plain_truth(db: Path, catalog: Catalog) -> tuple[int, list[int], list[int]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        ((n,),) = con.execute("SELECT COUNT(*) FROM patients WHERE _rank_general <= 1").fetchall()
        cap = catalog.views["conditions"].max_rows_per_person
        found = {
            g: (rows, persons)
            for g, rows, persons in con.execute(
                "SELECT condition_group, COUNT(*), COUNT(DISTINCT person_id) FROM conditions "
                "WHERE _rank_highly_sensitive <= ? GROUP BY condition_group",
                [cap],
            ).fetchall()
        }
    finally:
        con.close()
    domain = catalog.views["conditions"].columns["condition_group"].domain
    return (
        n,
        [found.get(g, (0, 0))[0] for g in domain],
        [found.get(g, (0, 0))[1] for g in domain],
    )


def _engine(directory: Path, db: Path, node_id: str) -> NodeEngine:
    path = write_node_config(
        directory,
        db,
        total_epsilon=RELEASES * (COUNT_EPSILON + GROUPED_EPSILON) + 1,
        max_epsilon_per_query=GROUPED_EPSILON,
        node_ceiling=RELEASES * (COUNT_EPSILON + GROUPED_EPSILON) + 1,
    )
    path.write_text(path.read_text().replace('node_id = "trust-test"', f'node_id = "{node_id}"'))
    return NodeEngine(load_node_config(path))


def _release_all(engine: NodeEngine) -> tuple[list[NodeResult], list[NodeResult]]:
    try:
        counts = [
            engine.answer(request(COUNT_SQL, COUNT_EPSILON, query_id=f"count-{i}"))
            for i in range(RELEASES)
        ]
        grouped = [
            engine.answer(request(GROUPED_SQL, GROUPED_EPSILON, query_id=f"grouped-{i}"))
            for i in range(RELEASES)
        ]
        assert len(engine.ledger.releases()) == 2 * RELEASES  # fresh noise, real debits
    finally:
        engine.close()
    return counts, grouped


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, catalog: Catalog) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    dbs = []
    for i, (node_id, persons, seed) in enumerate(TRUSTS):
        generate(root / node_id / "omop", persons, seed=seed, person_id_offset=i * ID_OFFSET)
        db = root / node_id / "node.duckdb"
        load_omop(root / node_id / "omop", db, catalog)
        dbs.append(db)
    truths = [_plain_truth(db, catalog) for db in dbs]  # before the engines lock the files
    engines = [
        _engine(root / node_id / "config", db, node_id)
        for (node_id, _, _), db in zip(TRUSTS, dbs, strict=True)
    ]
    with ThreadPoolExecutor(len(engines)) as pool:  # the trusts answer side by side
        released = list(pool.map(_release_all, engines))
    rules = OutputRules()
    raw_count = [[r[0][i] for r in released] for i in range(RELEASES)]
    raw_grouped = [[r[1][i] for r in released] for i in range(RELEASES)]
    yield Federation(
        count_truth=sum(t[0] for t in truths),
        rows_truth=[sum(col) for col in zip(*(t[1] for t in truths), strict=True)],
        persons_truth=[sum(col) for col in zip(*(t[2] for t in truths), strict=True)],
        counts=[combine(rs, rules) for rs in raw_count],
        grouped=[combine(rs, rules) for rs in raw_grouped],
        raw_count=raw_count,
        raw_grouped=raw_grouped,
    )


# -- exact reference distributions (brute force, independent of fedtre.dp) ---------------------


def _sum_pmf(scales: list[float]) -> np.ndarray:
    """The pmf of a sum of independent discrete Laplace variables, centred (index len // 2)."""
    out = np.array([1.0])
    for scale in scales:
        alpha = math.exp(-1 / scale)
        k = np.arange(-math.ceil(45 * scale), math.ceil(45 * scale) + 1)
        out = np.convolve(out, (1 - alpha) / (1 + alpha) * alpha ** np.abs(k))
    return out


def _coverage(scales: list[float], k: int) -> float:
    pmf = _sum_pmf(scales)
    centre = len(pmf) // 2
    return float(pmf[centre - k : centre + k + 1].sum())


def _window(trials: int, p: float) -> tuple[int, int]:
    tail = FALSE_FAILURE / ASSERTIONS / 2
    low = int(stats.binom.ppf(tail, trials, p))  # P(X < low) <= tail
    high = int(stats.binom.isf(tail, trials, p))  # P(X > high) <= tail
    return low, high


def _scales(results: list[NodeResult], aggregate: int) -> list[float]:
    return [r.aggregates[aggregate].statistics[0].noise_scale for r in results]


def _check_coverage(hits: int, trials: int, p_star: float, what: str) -> None:
    low, high = _window(trials, p_star)
    rate = hits / trials
    print(f"{what}: coverage {rate:.4f} over {trials} (p* = {p_star:.4f}, ok {low}-{high} hits)")
    assert low <= hits <= high, f"{what}: coverage {rate:.3%}, expected p* = {p_star:.3%}"


# -- tests ----------------------------------------------------------------------------------------


def test_trusts_really_differ_and_every_round_is_combined(federation: Federation):
    first = federation.raw_count[0]
    assert [r.node_id for r in first] == [t[0] for t in TRUSTS]
    assert federation.counts[0].covered == tuple(sorted(t[0] for t in TRUSTS))
    assert federation.count_truth == sum(t[1] for t in TRUSTS)  # one patients row per person
    assert min(federation.rows_truth) > 0 and min(federation.persons_truth) > 0
    assert len({c.columns[0].estimates[0].value for c in federation.counts}) > 50  # fresh noise


def test_count_star_combined_interval_coverage(federation: Federation):
    scales = _scales(federation.raw_count[0], 0)
    assert scales == pytest.approx([4.0] * 3)
    k = sum_halfwidth(scales)
    p_star = _coverage(scales, k)
    assert p_star >= 0.95 > _coverage(scales, k - 1)  # k is the exact smallest here
    hits = 0
    for combined, raw in zip(federation.counts, federation.raw_count, strict=True):
        assert _scales(raw, 0) == scales
        (est,) = combined.columns[0].estimates
        assert est.high is not None and est.low is not None and est.value is not None
        assert est.high - est.value == k  # no clipping near a count of thousands
        hits += est.low <= federation.count_truth <= est.high
    _check_coverage(hits, RELEASES, p_star, "COUNT(*) patients")


@pytest.mark.parametrize(("aggregate", "truth_field"), [(0, "rows_truth"), (1, "persons_truth")])
def test_grouped_combined_interval_coverage(federation: Federation, aggregate, truth_field):
    truth = getattr(federation, truth_field)
    scales = _scales(federation.raw_grouped[0], aggregate)
    k = sum_halfwidth(scales)
    p_star = _coverage(scales, k)
    assert p_star >= 0.95
    hits = np.zeros(len(truth), dtype=int)
    for combined in federation.grouped:
        column = combined.columns[aggregate]
        for j, (est, exact) in enumerate(zip(column.estimates, truth, strict=True)):
            assert est.low is not None and est.high is not None
            hits[j] += est.low <= exact <= est.high
    kind = federation.grouped[0].columns[aggregate].kind.value
    _check_coverage(int(hits.sum()), RELEASES * len(truth), p_star, f"{kind}, 13 cells pooled")
    if aggregate == 1:  # one named cell of the grouped COUNT(DISTINCT person_id)
        depression = [c[0] for c in federation.grouped[0].cells].index("depression")
        _check_coverage(int(hits[depression]), RELEASES, p_star, "persons, depression cell")


@pytest.mark.parametrize(("aggregate", "truth_field"), [(0, "rows_truth"), (1, "persons_truth")])
def test_combined_spread_matches_root_sum_of_squares(
    federation: Federation, aggregate, truth_field
):
    """E[(value - truth)²] over every cell and round against Σ std² of the trusts' noise.

    The ratio's sd is sqrt((κ - 1) / m) with κ the sum's exact kurtosis (κ - 1 ≈ 3 for three
    equal scales): about 1.7% for m = 13 × 800, so the sd itself is checked to about ±3%."""
    truth = np.asarray(getattr(federation, truth_field), dtype=np.float64)
    # the combined value before it is raised to 0 (small cells go below 0 at these scales)
    sums = np.asarray(
        [
            [r.aggregates[aggregate].statistics[0].values for r in raw]
            for raw in federation.raw_grouped
        ],
        dtype=np.float64,
    ).sum(axis=1)
    shown = np.asarray(
        [[e.value for e in c.columns[aggregate].estimates] for c in federation.grouped]
    )
    assert np.array_equal(shown, np.maximum(sums, 0))
    errors = sums - truth[None, :]
    raw = federation.raw_grouped[0]
    std = math.sqrt(sum(r.aggregates[aggregate].statistics[0].noise_std ** 2 for r in raw))
    scales = _scales(raw, aggregate)
    pmf = _sum_pmf(scales)
    x = np.arange(len(pmf)) - len(pmf) // 2
    var = float((pmf * x**2).sum())
    assert var == pytest.approx(std**2, rel=1e-9)  # noise_std is the exact sd
    kurtosis = float((pmf * x**4).sum()) / var**2
    ratio = float((errors**2).mean()) / std**2
    sd = math.sqrt((kurtosis - 1) / errors.size)
    z = stats.norm.isf(FALSE_FAILURE / ASSERTIONS / 2)
    print(f"aggregate {aggregate}: std ratio {math.sqrt(ratio):.4f} (window ±{z * sd / 2:.2%})")
    assert abs(ratio - 1) <= z * sd
    assert abs(errors.mean()) < z * std / math.sqrt(errors.size)
