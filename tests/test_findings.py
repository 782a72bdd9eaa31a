"""README's Findings section, generated from report.json files: both questions, each study (context length) a
column, each option's verdict with the number that decided it, its equal-training-time verdict, and what produced
each study; the README's text outside the markers untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynaformer.study.findings import BEGIN, END, findings_markdown, main, replace_section
from dynaformer.study.report import part_text
from dynaformer.study.results import report_data

from .study_fakes import fake_collected, fake_result, write_curve

README = Path(__file__).resolve().parents[1] / "README.md"


def _report(root: Path, context: int, qa_gain: float, created: str, cpu: str) -> dict:
    """report.json of a fake study at this context whose span arm gains `qa_gain` in story-QA exact match."""
    res = {}
    for v, ms in (("baseline", 100.0), ("dyn_span", 60.0), ("dyn_residual", 110.0)):
        gain = qa_gain if v == "dyn_span" else 0.0
        res[v] = [fake_result(v, s, context=context, qa=0.6 + gain + 0.01 * [0, 2, 1][s], ms=ms + [0, 2, 1][s],
                              bpb=2.0 + 0.01 * [1, 0, 2][s], far=0.3 + 0.02 * [2, 0, 1][s],
                              summary=0.5 + 0.01 * [1, 2, 0][s], gap=0.01 * [0, 1, 2][s]) for s in range(3)]
    col = fake_collected(res, root, grid=f"grid-{context}")
    for v, rs in res.items():
        for r in rs:
            s = r["seed"]
            qa = r["longrange"]["tasks"]["storyqa"]["exact"][0]
            write_curve(root / "cells" / v / f"seed{s}", {"baseline": 100.0, "dyn_span": 60.0}.get(v, 110.0),
                        {400: {"val_bpb": 2.5 + 0.01 * s, "val_exact_storyqa": qa / 2},
                         800: {"val_bpb": 2.0 + 0.01 * s, "val_exact_storyqa": qa}}, 800)
    data = report_data(col)
    data["provenance"].update(created=created, command="bash scripts/experiment.sh", cpu_capability=cpu,
                              git_commit="abc1234", cells_git_commit=["abc1234"], cells_train_s=3600.0, span_s=1200.0)
    return data


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("findings")
    paths = []
    for context, gain, created, cpu in ((1024, 0.0, "2026-02-03T10:00:00+00:00", "AVX512"),
                                        (128, 0.3, "2026-01-02T10:00:00+00:00", "AVX2")):
        data = _report(root / str(context), context, gain, created, cpu)
        p = root / f"report-{context}.json"
        p.write_text(json.dumps(data))
        paths.append(p)
    return paths


def test_findings_text_from_report_json(reports):
    datas = [json.loads(p.read_text()) for p in reports]
    md = findings_markdown(datas, [str(p) for p in reports])
    long, short = datas  # given long first; the section orders studies by context length
    assert md.index("grid-128, context 128") < md.index("grid-1024, context 1024")
    for key in ("residual", "span"):
        assert f"**{key.capitalize()} question.**" in md
    lines = md.splitlines()
    for d in (short, long):
        for v in d["verdicts"]:  # every option's verdict and the part that decided it, with its numbers
            row = next(ln for ln in lines if ln.startswith(f"| {v['option']}") and v["claim"] in ln
                       and lines.index(ln) > lines.index(f"**{v['question'].capitalize()} question.** "
                                                         f"{d['question_text'][v['question']]['title']}"))
            decided = v["evidence"][v["decided_by"][0]]
            assert f"**{v['verdict']}**: {part_text(decided, verdict=len(v['evidence']) > 1)}" in row
    # Span option 5 ("no significant gain") is contradicted at 128 tokens by the QA gain — shown as the QA part —
    # and not at 1,024, where there is no gain.
    five = next(ln for ln in lines if ln.startswith("| 5.") and "No significant gain" in ln)
    cell128, cell1024 = five.split(" | ")[1:3]
    assert cell128.startswith("**contradicted**: qa_acc ↑ by ≥ 0.05: supported (0.91 vs 0.61")
    assert not cell1024.startswith("**contradicted**: qa_acc")
    eq = next(o for o in short["wall_clock"]["questions"]["span"]["options"] if o["option"] == 5)["verdict"]
    assert f"equal time: {eq}" in cell128
    assert "| 3 ★. " in md  # the option the question's author marks correct
    # What produced each study: command, date, commit, CPU kind, training time.
    assert ("`bash scripts/experiment.sh` on 2026-01-02, commit abc1234, CPU kind AVX2" in md
            and "on 2026-02-03" in md and "CPU kind AVX512" in md and "60 min of training in all" in md)
    # What each study's data can tell, one sentence per question and study.
    assert md.count("grid-128, context 128: With 3 seeds") == 2
    assert f"python -m dynaformer.study.findings {reports[0]} {reports[1]}" in md


def test_readme_section_is_replaced_between_the_markers(reports, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n\n## Findings\n\n{BEGIN}\nold text\n{END}\n\n## Next\nrest\n")
    assert main([str(p) for p in reports] + ["--readme", str(readme)]) == 0
    once = readme.read_text()
    assert once.startswith("# x\n\nintro\n\n## Findings\n\n" + BEGIN + "\n")
    assert once.endswith(f"{END}\n\n## Next\nrest\n")
    assert "old text" not in once and "grid-128, context 128" in once
    assert main([str(p) for p in reports] + ["--readme", str(readme)]) == 0
    assert readme.read_text() == once  # regenerating changes nothing
    readme.write_text("# no markers\n")
    assert main([str(reports[0]), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "findings:begin" in err[0]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main([str(bad), "--print"]) == 2 and "not a report.json" in capsys.readouterr().err
    with pytest.raises(Exception, match="markers|findings:begin"):
        replace_section(f"{END}\n{BEGIN}\n", "x")


def test_an_older_report_json_still_reads(reports):
    """report.json written before the correction: seed_answer, no decided_by, no provenance or question text."""
    data = json.loads(reports[1].read_text())
    for v in data["verdicts"]:
        v["seed_answer"] = v.pop("marked_correct")
        del v["decided_by"]
        for e in v["evidence"]:
            e.pop("decisive", None)
    for key in ("provenance", "question_text", "families", "wall_clock"):
        del data[key]
    md = findings_markdown([data])
    assert "| 3 ★. " in md and "grid-128, context 128" in md and "dynaformer report" in md


def test_the_readme_has_one_generated_section():
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and text.index(BEGIN) < text.index(END)
    assert "## Findings" in text[: text.index(BEGIN)]


def test_report_json_records_what_the_findings_need(tmp_path, monkeypatch):
    import os

    import torch

    res = {v: [fake_result(v, s, context=1024, bpb=2.0 + 0.01 * s) for s in range(2)]
           for v in ("baseline", "dyn_span", "dyn_residual")}
    col = fake_collected(res, tmp_path, grid="grid-long")
    for d in (d for ds in col.dirs.values() for d in ds):
        (d / "run").mkdir()
        (d / "run" / "run.json").write_text(json.dumps({"env": {"git_commit": "beef123"},
                                                        "created": "2026-03-01T10:00:00+00:00"}))
        (d / "result.json").write_text("{}")
        t = 1772359200 + 1800  # 2026-03-01T10:30:00Z
        os.utime(d / "result.json", (t, t))
    monkeypatch.setenv("DYNAFORMER_STUDY_COMMAND", "bash scripts/experiment.sh --long")
    prov = report_data(col)["provenance"]
    assert prov["grids"] == ["grid-long"] and prov["context_len"] == 1024 and prov["cells"] == 6
    assert prov["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert prov["cells_git_commit"] == ["beef123"] and prov["span_s"] == pytest.approx(1800.0)
    assert prov["cells_train_s"] == pytest.approx(6 * 60.0) and prov["command"] == "bash scripts/experiment.sh --long"
    assert prov["created"][:4].isdigit() and "T" in prov["created"]
