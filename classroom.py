"""Class mode: student notebooks made from the series with nbgrader, and their grading.

    python classroom.py build [--course class] [NOTEBOOK ...]   what `make class` runs
    python classroom.py grade SUBMISSIONS [--course class]      what `make grade` runs
    python classroom.py try NOTEBOOK [--wrong ID OLD NEW]        a maintainer's check of the marks
    python classroom.py table                                    the table of assignments

The committed notebooks are the source. Their cell metadata marks the class:
- a solution cell has nbgrader's {"solution": true, ...} and
  {"tinyssd": {"student_writes": [names]}}: the bodies of those functions ("f") or methods
  ("Class.method"), everything after the docstring, become the student's `# YOUR CODE HERE` /
  `raise NotImplementedError()`;
- a graded cell has nbgrader's {"grade": true, "locked": true, "points": n, ...}: its asserts, which
  check the student's function against the helper on real inputs, are the grader.
Nothing else in a cell changes, so a learner sees the same notebook and nbval runs the same code.

`build` turns the marks into nbgrader's ### BEGIN/END SOLUTION regions in class/source, points the
notebooks' ../ paths at files copied beside them, puts a class-mode header first (fast mode, so
checks that need a model load the small one), and runs `nbgrader generate_assignment` into
class/release: one assignment per notebook. TEACHING.md is the teacher's guide.
"""
import argparse
import ast
import copy
import csv
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = REPO / "notebooks"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
# ../X in a notebook -> the path of X beside the student's notebook
LOCAL_PATHS = {"../img/": "img/", "../tests/studies/results/": "results/", "../data": "data"}
SETTINGS = [  # passed on every nbgrader command line, so a teacher's config cannot lose them
    "--Execute.timeout=600",
    "--CourseDirectory.ignore=['.ipynb_checkpoints', '*.pyc', '__pycache__', 'data']",
]
HEADER = [
    ("markdown",
     "**Class version.** Write your answers where a cell says `# YOUR CODE HERE`, in place of "
     "`raise NotImplementedError()`. The cells that check your answers are locked: run them to see "
     "whether your answer passes. They are the ones that are graded.\n\n"
     "This version runs in fast mode: long trainings are shortened, and the notebooks after 07 "
     "load the small model that fast mode trains. Numbers in the text come from the full run of "
     "the series, so yours will differ."),
    ("code",
     "import os\n\n"
     "# fast mode unless Jupyter was started with TINYSSD_FAST=0\n"
     'os.environ.setdefault("TINYSSD_FAST", "1")'),
]


class ClassError(Exception):
    """A problem with the marks, the course folder or the submissions, said with what to do."""


# ---------------------------------------------------------------------------
# The marks
# ---------------------------------------------------------------------------

def read_notebook(path):
    """The notebook at path as a dict (nbformat 4 JSON)."""
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))


def source(cell):
    """A cell's source as one string."""
    text = cell["source"]
    return text if isinstance(text, str) else "".join(text)


def marks(cell):
    """The cell's nbgrader metadata, or {} if it has none."""
    return cell.get("metadata", {}).get("nbgrader", {})


def graded_cells(nb):
    """{grade_id: points} of the notebook's graded cells."""
    return {marks(c)["grade_id"]: marks(c)["points"] for c in nb["cells"] if marks(c).get("grade")}


def solution_cells(nb):
    """{grade_id: cell} of the notebook's solution cells."""
    return {marks(c)["grade_id"]: c for c in nb["cells"] if marks(c).get("solution")}


def _function(tree, name):
    """The ast node of top-level function `name`, or of method `Class.method`; None if absent."""
    parts = name.split(".")
    nodes = tree.body
    for i, part in enumerate(parts):
        want = ast.ClassDef if i < len(parts) - 1 else (ast.FunctionDef, ast.AsyncFunctionDef)
        found = [n for n in nodes if isinstance(n, want) and n.name == part]
        if not found:
            return None
        nodes = found[0].body
    return found[0]


def _body_lines(node, lines):
    """(first, last) 0-based lines of a function's body after its docstring."""
    body = node.body
    has_doc = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
               and isinstance(body[0].value.value, str))
    if has_doc:
        if len(body) == 1:
            raise ClassError(f"{node.name} has only a docstring: nothing for a student to write")
        first = body[0].end_lineno  # the line after the docstring (0-based)
    else:
        first = body[0].lineno - 1
        while first - 1 >= node.lineno and lines[first - 1].strip().startswith("#"):
            first -= 1  # comments above the first statement belong to the answer
    if first < node.lineno or body[-1].end_lineno <= node.lineno - 1:
        raise ClassError(f"{node.name}: put its body on the lines below its def")
    return first, body[-1].end_lineno - 1


def add_solution_regions(cell, where):
    """Return a copy of a solution cell with ### BEGIN/END SOLUTION around the bodies its
    tinyssd.student_writes names. where: 'notebook, cell N', for error messages."""
    names = cell.get("metadata", {}).get("tinyssd", {}).get("student_writes")
    if not names:
        return cell  # nbgrader's own rule: the whole cell is the answer
    text = source(cell)
    if BEGIN in text or END in text:
        raise ClassError(f"{where}: has its own solution delimiters; mark it with metadata only")
    lines = text.split("\n")
    tree = ast.parse(text)
    regions = []
    for name in names:
        node = _function(tree, name)
        if node is None:
            raise ClassError(f"{where}: student_writes names {name!r}, which the cell does not "
                             "define. Name a function, or a method as Class.method.")
        regions.append(_body_lines(node, lines))
    for first, last in sorted(regions, reverse=True):
        indent = re.match(r"\s*", lines[first]).group(0) or re.match(
            r"\s*", lines[last]).group(0)
        lines[last + 1:last + 1] = [indent + END]
        lines[first:first] = [indent + BEGIN]
    cell = copy.deepcopy(cell)
    cell["source"] = "\n".join(lines)
    return cell


def localise(text):
    """(text with ../ paths pointed beside the notebook, repo paths of files to copy there)."""
    files = sorted(set(re.findall(r"\.\./((?:img|tests/studies/results)/[\w.-]+)", text)))
    for old, new in LOCAL_PATHS.items():
        text = text.replace(old, new)
    return text, files


def source_notebook(path):
    """(the notebook at path as nbgrader's source, [repo files it reads]). Raises ClassError."""
    nb = read_notebook(path)
    files, seen = [], set()
    for i, cell in enumerate(nb["cells"]):
        mark = marks(cell)
        if mark:
            if mark.get("grade_id") in seen:
                raise ClassError(f"{path.name}, cell {i}: grade_id {mark.get('grade_id')!r} is "
                                 "used twice; give each marked cell its own.")
            seen.add(mark.get("grade_id"))
        if mark.get("solution"):
            cell = nb["cells"][i] = add_solution_regions(cell, f"{path.name}, cell {i}")
        cell["source"], used = localise(source(cell))
        files += used
    for file in files:
        if not (REPO / file).is_file():
            raise ClassError(f"{path.name} reads ../{file}, which does not exist")
    return nb, sorted(set(files))


# ---------------------------------------------------------------------------
# nbgrader
# ---------------------------------------------------------------------------

def nbgrader(course, *args, db=None, check=True):
    """Run an nbgrader command on the course folder and return its log; with check, raise
    ClassError with the log if it failed. Notebooks it runs run in fast mode."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               TINYSSD_FAST="1")
    db = pathlib.Path(db or pathlib.Path(course) / "gradebook.db").resolve()
    command = [sys.executable, "-m", "nbgrader", *args, f"--CourseDirectory.root={course}",
               f"--CourseDirectory.db_url=sqlite:///{db}", *SETTINGS]
    done = subprocess.run(command, cwd=course, env=env, capture_output=True, text=True)
    failed = re.search(r"Traceback|\| (ERROR|CRITICAL)\]", done.stderr)
    if check and (done.returncode != 0 or failed):
        start = failed.start() if failed else max(0, len(done.stderr) - 3000)
        raise ClassError(f"nbgrader {args[0]} failed:\n{done.stderr[start:start + 3000]}")
    return done.stderr


def write_header(path):
    """The class-mode header notebook nbgrader puts before every student notebook."""
    cells = [{"cell_type": kind, "metadata": {}, "source": text, "id": f"class-header-{i}",
              **({"outputs": [], "execution_count": None} if kind == "code" else {})}
             for i, (kind, text) in enumerate(HEADER)]
    nb = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb, indent=1) + "\n", encoding="utf-8")


def make_source(course, names):
    """Write course/source/<name>/<name>.ipynb with the files it reads, and the header."""
    (course / "source").mkdir(parents=True, exist_ok=True)
    write_header(course / "source" / "header.ipynb")
    for name in names:
        nb, files = source_notebook(NOTEBOOKS / f"{name}.ipynb")
        folder = course / "source" / name
        folder.mkdir()
        (folder / f"{name}.ipynb").write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
        for file in files:
            target = folder / localise("../" + file)[0]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / file, target)


def generate(course, db=None):
    """nbgrader generate_assignment for every notebook in course/source -> course/release."""
    header = (course / "source" / "header.ipynb").resolve()
    nbgrader(course, "generate_assignment", "*", "--force",
             f"--IncludeHeaderFooter.header={header}", db=db)


def paste_solutions(student_nb, source_nb, change=None):
    """A copy of a student notebook with every solution cell's source from the source notebook:
    the answers pasted back. change: (grade_id, old, new) makes one answer wrong on purpose."""
    answers = solution_cells(source_nb)
    nb = copy.deepcopy(student_nb)
    for cell in nb["cells"]:
        grade_id = marks(cell).get("grade_id")
        if marks(cell).get("solution"):
            text, _ = localise(source(answers[grade_id]))
            if change is not None and change[0] == grade_id:
                if change[1] not in text:
                    raise ClassError(f"{grade_id}: {change[1]!r} is not in its answer")
                text = text.replace(change[1], change[2])
            cell["source"] = text
    return nb


def autograde(course, name, notebooks):
    """Grade {student: notebook} for assignment `name` of a generated course.

    Returns {student: {"errors": [(cell index, grade_id or None, error name)],
    "scores": {grade_id: (score, max_score)}}}.
    """
    for student, nb in notebooks.items():
        folder = course / "submitted" / student / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.ipynb").write_text(json.dumps(nb, indent=1, ensure_ascii=False),
                                              encoding="utf-8")
    nbgrader(course, "autograde", name, "--force")
    return {student: {"errors": cell_errors(course, student, name),
                      "scores": scores(course, name, student)} for student in notebooks}


def cell_errors(course, student, name):
    """[(cell index, grade_id or None, error name)] of a notebook nbgrader graded."""
    nb = read_notebook(course / "autograded" / student / name / f"{name}.ipynb")
    return [(i, marks(c).get("grade_id"), out["ename"]) for i, c in enumerate(nb["cells"])
            for out in c.get("outputs", []) if out["output_type"] == "error"]


def scores(course, name, student):
    """{grade_id: (score, max_score)} of one student's graded notebook in the gradebook; None if
    it has none."""
    from nbgrader.api import Gradebook

    from nbgrader.api import MissingEntry

    with Gradebook(f"sqlite:///{(course / 'gradebook.db').resolve()}") as gb:
        try:
            submission = gb.find_submission_notebook(name, name, student)
        except MissingEntry:
            return None  # nbgrader could not grade it
        return {g.name: (g.score, g.max_score) for g in submission.grades}


def problems_handed_out(result, graded):
    """What is wrong with a notebook run as handed out: a graded check that passes, or an error
    other than the stub's NotImplementedError outside the graded cells."""
    failed = {grade_id for _, grade_id, _ in result["errors"]}
    found = [f"graded cell {g} passes with no answer written" for g in graded if g not in failed]
    found += [f"cell {i}: {ename} outside the graded cells"
              for i, grade_id, ename in result["errors"]
              if grade_id not in graded and ename != "NotImplementedError"]
    return found


def problems_solved(result):
    """What is wrong with a notebook that has its answers pasted back: any error, any lost point."""
    found = [f"cell {i} ({grade_id}): {ename}" for i, grade_id, ename in result["errors"]]
    found += [f"{g}: {s} of {m} points" for g, (s, m) in result["scores"].items() if s != m]
    return found


# ---------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------

def all_names():
    """The stems of the series' notebooks, in order."""
    return sorted(p.stem for p in NOTEBOOKS.glob("[0-9]*.ipynb"))


def _inputs_digest(names):
    """sha256 over this script and the notebooks and files a build reads."""
    digest = hashlib.sha256(pathlib.Path(__file__).read_bytes())
    for name in names:
        path = NOTEBOOKS / f"{name}.ipynb"
        digest.update(path.read_bytes())
        for file in source_notebook(path)[1]:
            digest.update((REPO / file).read_bytes())
    return digest.hexdigest()


def build(course, names, model=True):
    """Write course/source and course/release (nbgrader's folders), each atomically; make the
    datasets and the small model the checks load. Nothing of the teacher's is replaced."""
    import ssd_helpers as H

    course = pathlib.Path(course).resolve()
    unknown = sorted(set(names) - set(all_names()))
    if unknown:
        raise ClassError(f"no notebook named {', '.join(unknown)}; the series has "
                         f"{', '.join(all_names())}")
    course.mkdir(parents=True, exist_ok=True)
    config = course / "nbgrader_config.py"
    if not config.exists():
        config.write_text("# Written once by `make class`, then yours: it is never replaced. The\n"
                          "# series' own commands pass these two settings on the command line.\n"
                          "c = get_config()\n"
                          + "".join(f"c.{arg[2:].replace('=', ' = ', 1)}\n" for arg in SETTINGS),
                          encoding="utf-8")
    params = {"kind": "class", "names": names, "inputs": _inputs_digest(names)}
    with tempfile.TemporaryDirectory(prefix=".build-", dir=course) as tmp:
        tmp = pathlib.Path(tmp)
        make_source(tmp, names)
        generate(tmp, db=course / "gradebook.db")
        for step in ("release", "source"):
            try:
                H.build_atomically(course / step, {**params, "kind": f"class-{step}"},
                                   lambda out, step=step: shutil.copytree(tmp / step, out,
                                                                          dirs_exist_ok=True),
                                   advice="make class replaces it only when nobody has edited "
                                   "it: move those files away, then run make class again.")
            except FileExistsError as error:
                done = " (class/release was updated.)" * (step == "source")
                raise ClassError(f"{error}{done}") from None
    if model:
        print("The datasets and the small model the checks load:")
        H.load_default_model(H.pick_device("cpu"), fast=True)
    print(f"Student notebooks: {course / 'release'}/<notebook>/ ({len(names)} notebooks)")


def try_notebook(name, change=None):
    """Generate one student notebook, grade it as handed out and with its answers pasted back
    (and, given change=(grade_id, old, new), with one answer made wrong), print what happened,
    and return the problems found."""
    with tempfile.TemporaryDirectory() as tmp:
        course = pathlib.Path(tmp)
        make_source(course, [name])
        generate(course)
        released = read_notebook(course / "release" / name / f"{name}.ipynb")
        source_nb = read_notebook(NOTEBOOKS / f"{name}.ipynb")
        students = {"handed_out": released, "solved": paste_solutions(released, source_nb)}
        if change is not None:
            students["wrong"] = paste_solutions(released, source_nb, change)
        results = autograde(course, name, students)
    graded = graded_cells(source_nb)
    for student, result in results.items():
        print(f"{name}, {student}:")
        for i, grade_id, ename in result["errors"]:
            print(f"  cell {i:3d} {grade_id or '':24s} {ename}")
        for grade_id, (score, most) in result["scores"].items():
            print(f"  {grade_id:32s} {score:g} of {most:g}")
    found = problems_handed_out(results["handed_out"], graded)
    found += problems_solved(results["solved"])
    if change is not None and not problems_solved(results["wrong"]):
        found.append("the wrong answer loses no points")
    return found


def assignment_table(names):
    """The Markdown table of what each notebook hands out and grades; TEACHING.md holds it."""
    rows = ["| notebook | the student writes | graded checks (points) |", "|---|---|---|"]
    for name in names:
        nb = read_notebook(NOTEBOOKS / f"{name}.ipynb")
        writes = [w for grade_id, c in solution_cells(nb).items()
                  for w in c["metadata"].get("tinyssd", {}).get("student_writes", [grade_id])]
        checks = ", ".join(f"`{g}` ({p})" for g, p in graded_cells(nb).items())
        rows.append(f"| `{name}` | {', '.join(f'`{w}`' for w in writes)} | {checks} |")
    return "\n".join(rows)


def check_notebook(path):
    """Raise ClassError naming the file unless it is a notebook nbgrader can read."""
    import nbformat

    try:
        nbformat.read(path, as_version=4)
    except (OSError, UnicodeDecodeError, ValueError, nbformat.ValidationError) as error:
        raise ClassError(f"{path} is not a notebook Jupyter can read ({type(error).__name__}: "
                         f"{str(error)[:200]}). Ask the student for the file again, or move it "
                         "out of the folder; nothing was graded.") from None


def find_submissions(folder, names):
    """{notebook name: [student, ...]} of a folder laid out as <student>/<name>/<name>.ipynb,
    the way nbgrader collects work. Anything else there raises ClassError naming it."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ClassError(f"{folder} is not a folder of submissions")
    found = {}
    for student in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if not student.is_dir():
            raise ClassError(f"{student}: expected a folder per student, holding a folder per "
                             "notebook, such as alice/01_predictors/01_predictors.ipynb")
        for work in sorted(p for p in student.iterdir() if not p.name.startswith(".")):
            if work.name not in names:
                raise ClassError(f"{work}: not a notebook folder of this class. Name each folder "
                                 f"after its notebook: {', '.join(names)}")
            if not (work / f"{work.name}.ipynb").is_file():
                raise ClassError(f"{work} has no {work.name}.ipynb. Rename the student's "
                                 "notebook to that name (one notebook per folder).")
            check_notebook(work / f"{work.name}.ipynb")
            found.setdefault(work.name, []).append(student.name)
    if not found:
        raise ClassError(f"{folder} holds no submissions, such as "
                         "alice/01_predictors/01_predictors.ipynb")
    return found


def grade(course, submissions):
    """Autograde every submission in the folder; write course/grades/{tests,totals}.csv and print
    the totals. Returns {(student, notebook): (score, max_score)}."""
    import ssd_helpers as H

    course = pathlib.Path(course).resolve()
    release = course / "release"
    names = sorted(p.name for p in release.iterdir() if p.is_dir()) if release.is_dir() else []
    if not names:
        raise ClassError(f"{course} has no student notebooks yet: run `make class` first")
    found = find_submissions(submissions, names)
    submitted = f"--CourseDirectory.submitted_directory={pathlib.Path(submissions).resolve()}"
    print(f"grading {sum(map(len, found.values()))} notebooks of "
          f"{len({s for students in found.values() for s in students})} students")
    log = nbgrader(course, "autograde", "*", "--force", submitted, check=False)
    rows, failed = [], []
    for name, students in found.items():
        for student in students:
            graded = scores(course, name, student)
            if graded is None or not (course / "autograded" / student / name).is_dir():
                failed.append(f"{student}/{name}")  # no row: not a score of 0
                continue
            rows += [(student, name, test, score, most) for test, (score, most) in graded.items()]
    if failed:
        print(f"not graded, see nbgrader's log below: {', '.join(failed)}\n"
              + "\n".join(line for line in log.splitlines() if "ERROR" in line or "Error" in line))
    totals = {}
    for student, name, _, score, most in rows:
        got, out_of = totals.get((student, name), (0.0, 0.0))
        totals[student, name] = (got + score, out_of + most)

    def write(out):
        with open(out / "tests.csv", "w", newline="") as f:
            csv.writer(f).writerows([("student", "notebook", "test", "score", "max_score"),
                                     *[(s, n, t, f"{a:g}", f"{b:g}") for s, n, t, a, b in rows]])
        with open(out / "totals.csv", "w", newline="") as f:
            csv.writer(f).writerows([("student", "notebook", "score", "max_score"),
                                     *[(s, n, f"{a:g}", f"{b:g}")
                                       for (s, n), (a, b) in sorted(totals.items())]])
    H.build_atomically(course / "grades", {"kind": "class-grades", "rows": rows}, write,
                       advice="make grade replaces it only when nobody has edited it: move those "
                       "files away, then grade again.")
    for (student, name), (got, out_of) in sorted(totals.items()):
        print(f"{student:20s} {name:28s} {got:g} of {out_of:g}")
    print(f"Grade sheets: {course / 'grades'}/tests.csv (per check) and totals.csv")
    return totals


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="classroom.py", description="Student notebooks made from the series with nbgrader, "
        "and their grading. See TEACHING.md.")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="write the student notebooks (make class)")
    make.add_argument("notebooks", nargs="*", help="notebook names, such as 01_predictors "
                      "(default: all)")
    make.add_argument("--course", default=REPO / "class", help="course folder (default: class)")
    make.add_argument("--no-model", action="store_true",
                      help="skip making the datasets and the small model the checks load")
    mark = commands.add_parser("grade", help="grade a folder of submissions (make grade)")
    mark.add_argument("submissions",
                      help="folder laid out as <student>/<notebook>/<notebook>.ipynb")
    mark.add_argument("--course", default=REPO / "class", help="course folder (default: class)")
    check = commands.add_parser("try", help="check one notebook's marks: graded as handed out "
                                "and with its answers pasted back")
    check.add_argument("notebook", help="notebook name, such as 04a_anchors")
    check.add_argument("--wrong", nargs=3, metavar=("GRADE_ID", "OLD", "NEW"),
                       help="also grade the answers with OLD replaced by NEW in solution cell "
                       "GRADE_ID: a wrong answer that must lose points")
    commands.add_parser("table", help="print the table of assignments that TEACHING.md holds")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build(args.course, args.notebooks or all_names(), model=not args.no_model)
        elif args.command == "grade":
            grade(args.course, args.submissions)
        elif args.command == "table":
            print(assignment_table(all_names()))
        else:
            found = try_notebook(args.notebook, args.wrong)
            print("\n".join(["problems:", *found]) if found else "marks are sound")
            return 1 if found else 0
    except (ClassError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
