"""Class mode (classroom.py, TEACHING.md), end to end with nbgrader.

The student notebooks generated from the committed ones hold no answers. Graded as handed out they
fail every graded check, with no other error than the stub's NotImplementedError. With the answers
pasted back they pass with full points; with a plausible wrong answer they lose points on the check
of that answer, and only there.
"""
import copy
import csv
import json
import re

import pytest

import classroom as C

# Notebooks graded end to end, and per notebook a plausible wrong answer:
# (solution cell's grade_id, text in its answer, what a student writes instead, check that fails)
WRONG = {
    "01_predictors": ("cls_predictor", "num_anchors * (num_classes + 1)",
                      "num_anchors * num_classes", "heads_match_helpers"),
    "04a_anchors": ("box_iou", "areas1[:, None] + areas2 - inter_areas",
                    "areas1[:, None] + areas2", "box_iou_matches_torchvision_and_helper"),
    "04b_labelling_and_nms": ("nms", "order = rest[iou <= iou_threshold]", "order = rest",
                              "nms_matches_torchvision_and_helper"),
}
# The coverage: every notebook hands out at least one answer and grades it.
ASSIGNED = C.all_names()


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A course folder made by `classroom.py build` (all notebooks; no model needed)."""
    course = tmp_path_factory.mktemp("course") / "class"
    C.build(course, C.all_names(), model=False)
    return course


def student(course, name):
    return C.read_notebook(course / "release" / name / f"{name}.ipynb")


def answer_lines(cell):
    """The code lines of a solution cell's answers (inside the solution regions)."""
    text = C.source(C.add_solution_regions(cell, "test"))
    regions = re.findall(rf"{C.BEGIN}\n(.*?)\n\s*{C.END}", text, flags=re.S)
    return [line.strip() for region in regions for line in region.split("\n")
            if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("name", ASSIGNED)
def test_every_notebook_hands_out_an_answer_and_grades_it(name):
    nb = C.read_notebook(C.NOTEBOOKS / f"{name}.ipynb")
    graded = [c for c in nb["cells"] if C.marks(c).get("grade")]
    assert C.solution_cells(nb), f"{name} has no solution cell"
    assert graded, f"{name} has no graded cell"
    for cell in graded:
        assert C.marks(cell)["points"] > 0 and "assert" in C.source(cell)
    for cell in C.solution_cells(nb).values():
        assert answer_lines(cell), "a solution cell with nothing for the student to write"


def test_the_teachers_guide_lists_the_assignments_as_marked():
    assert C.assignment_table(C.all_names()) in (C.REPO / "TEACHING.md").read_text()


@pytest.mark.parametrize("name", C.all_names())
def test_student_notebooks_hold_no_answers_and_nothing_else_changes(course, name):
    source_nb = C.read_notebook(C.NOTEBOOKS / f"{name}.ipynb")
    handed_out = student(course, name)
    header, cells = handed_out["cells"][:len(C.HEADER)], handed_out["cells"][len(C.HEADER):]
    assert [C.source(c) for c in header] == [text for _, text in C.HEADER]
    assert len(cells) == len(source_nb["cells"])
    for ours, theirs in zip(source_nb["cells"], cells):
        text = C.source(theirs)
        assert "../" not in text or ours["cell_type"] == "markdown"
        assert C.BEGIN not in text and C.END not in text
        assert not theirs.get("outputs")
        if C.marks(ours).get("solution"):
            assert "raise NotImplementedError()" in text
            student_lines = {line.strip() for line in text.split("\n")}
            assert not set(answer_lines(ours)) & student_lines, "an answer line was handed out"
        else:
            assert text == C.localise(C.source(ours))[0]


def test_grading_end_to_end(course, tmp_path, capsys):
    """Three students per notebook: the notebook as handed out, with the answers pasted back, and
    with one wrong answer. `classroom.py grade` grades the folder."""
    submissions = tmp_path / "submissions"
    for name, change in WRONG.items():
        handed_out = student(course, name)
        source_nb = C.read_notebook(C.NOTEBOOKS / f"{name}.ipynb")
        work = {"handed_out": handed_out,
                "solved": C.paste_solutions(handed_out, source_nb),
                "wrong": C.paste_solutions(handed_out, source_nb, change=change[:3])}
        if name == "01_predictors":  # a submission that kills its kernel is not graded
            work["crashed"] = copy.deepcopy(work["solved"])
            first = next(c for c in work["crashed"]["cells"] if c["cell_type"] == "code")
            first["source"] = "import os\n\nos._exit(1)"
        for who, nb in work.items():
            folder = submissions / who / name
            folder.mkdir(parents=True)
            (folder / f"{name}.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    totals = C.grade(course, submissions)
    assert ("crashed", "01_predictors") not in totals and "not graded" in capsys.readouterr().out
    with open(course / "grades" / "tests.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name, (_, _, _, failing) in WRONG.items():
        graded = C.graded_cells(C.read_notebook(C.NOTEBOOKS / f"{name}.ipynb"))
        got = {(r["student"], r["test"]): float(r["score"]) for r in rows if r["notebook"] == name}
        assert totals["handed_out", name][0] == 0
        assert totals["solved", name] == (sum(graded.values()),) * 2
        assert got["wrong", failing] == 0, f"{name}: the wrong answer passed {failing}"
        assert all(got["wrong", g] == p for g, p in graded.items() if g != failing)
        result = {who: C.cell_errors(course, who, name) for who in ("handed_out", "solved")}
        assert C.problems_handed_out({"errors": result["handed_out"]}, graded) == []
        assert result["solved"] == []


def test_a_rebuild_never_replaces_a_student_notebook_someone_edited(course, monkeypatch):
    edited = course / "release" / "03_blocks" / "03_blocks.ipynb"
    edited.write_text(edited.read_text() + " ")
    C.build(course, C.all_names(), model=False)  # the same inputs: nothing to replace
    monkeypatch.setattr(C, "_inputs_digest", lambda names: "a notebook changed")
    with pytest.raises(C.ClassError, match="03_blocks.ipynb .changed since the series wrote it"):
        C.build(course, C.all_names(), model=False)
    assert edited.read_text().endswith(" ")


def test_grade_refuses_a_folder_it_cannot_read(tmp_path):
    names = ["01_predictors"]
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "01_predictors.ipynb").write_text("{}")
    with pytest.raises(C.ClassError, match="alice/01_predictors.ipynb: not a notebook folder"):
        C.find_submissions(tmp_path, names)
    (tmp_path / "alice" / "01_predictors.ipynb").unlink()
    (tmp_path / "alice" / "01_predictors").mkdir()
    (tmp_path / "alice" / "01_predictors" / "01_predictors-Copy1.ipynb").write_text("{}")
    with pytest.raises(C.ClassError, match="has no 01_predictors.ipynb"):
        C.find_submissions(tmp_path, names)
    (tmp_path / "alice" / "01_predictors" / "01_predictors-Copy1.ipynb").rename(
        tmp_path / "alice" / "01_predictors" / "01_predictors.ipynb")
    (tmp_path / "alice" / "01_predictors" / "01_predictors.ipynb").write_text('{"cells": [')
    with pytest.raises(C.ClassError, match="01_predictors.ipynb is not a notebook Jupyter can"):
        C.find_submissions(tmp_path, names)
    (tmp_path / "alice" / "01_predictors" / "01_predictors.ipynb").write_text(
        json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert C.find_submissions(tmp_path, names) == {"01_predictors": ["alice"]}
    (tmp_path / "bob.ipynb").write_text("{}")
    with pytest.raises(C.ClassError, match="bob.ipynb: expected a folder per student"):
        C.find_submissions(tmp_path, names)


def cell(text, writes):
    """A solution cell whose student writes the bodies named in writes."""
    return {"cell_type": "code", "source": text,
            "metadata": {"tinyssd": {"student_writes": writes}}}


def test_solution_regions_keep_signature_docstring_and_other_lines():
    text = ('class Net:\n    def __init__(self):\n        self.k = 2\n\n'
            '    def forward(self, x):\n        """Doubles x."""\n        # scale\n'
            '        return x * self.k\n\n\nprint(Net().forward(1))')
    marked = C.source(C.add_solution_regions(cell(text, ["Net.forward"]), "t"))
    assert marked == ('class Net:\n    def __init__(self):\n        self.k = 2\n\n'
                      '    def forward(self, x):\n        """Doubles x."""\n'
                      f'        {C.BEGIN}\n        # scale\n        return x * self.k\n'
                      f'        {C.END}\n\n\nprint(Net().forward(1))')


def test_solution_regions_refuse_what_they_cannot_mark():
    with pytest.raises(C.ClassError, match="'g', which the cell does not define"):
        C.add_solution_regions(cell("def f():\n    return 1", ["g"]), "t")
    with pytest.raises(C.ClassError, match="on the lines below its def"):
        C.add_solution_regions(cell("def f(): return 1", ["f"]), "t")
    with pytest.raises(C.ClassError, match="only a docstring"):
        C.add_solution_regions(cell('def f():\n    """Nothing."""', ["f"]), "t")
