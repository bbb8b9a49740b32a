#!/usr/bin/env python
"""Mutation score of the code whose numbers reach the tables (on demand, not part of CI's run).

Mutates, with mutmut 3, the functions listed in FUNCTIONS -- FID/IS and their bootstrap
(ddaepp.scores), the significance marks (ddaepp.significance), rectified flow (ddaepp.transport),
the linear probes (ddaepp.linear_probe), and the label and noise draws of sampling and training --
and runs against each mutant only the fast tests in TESTS that call the mutated function. Prints
killed / total and the survivors; every survivor is explained in tests/mutation/survivors.md.

    .venv/bin/pip install mutmut==3.8.1
    .venv/bin/python tests/mutation/run.py                        # the working tree's tests
    .venv/bin/python tests/mutation/run.py --tests-from 1508dcf   # the same, with tests/ of a commit

Works in a scratch copy (results/mutation/<name>: src/, tests/, config files, and a pyproject.toml
with mutmut's settings), so the worktree is never mutated. About 15 minutes on two busy CPU cores.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FILES = ["src/ddaepp/scores.py", "src/ddaepp/significance.py", "src/ddaepp/transport.py",
         "src/ddaepp/linear_probe.py", "src/ddaepp/sample.py", "src/ddaepp/objectives/__init__.py",
         "src/ddaepp/objectives/csd.py"]
# The functions that compute the numbers (mutmut's names: module.x_function__mutmut_N,
# module.xǁClassǁmethod__mutmut_N); chosen so that a run takes minutes on two busy cores.
FUNCTIONS = ["ddaepp.scores.x_inception_score_splits__*", "ddaepp.scores.xǁFrechetToReferenceǁdistance__*",
             "ddaepp.scores.x_bootstrap_indices__*", "ddaepp.scores.x_percentile_interval__*",
             "ddaepp.significance.x_mcnemar_exact__*", "ddaepp.significance.x_bootstrap_test__*",
             "ddaepp.significance.x_across_seeds__*",
             "ddaepp.transport.x_sample_t__*", "ddaepp.transport.x_interpolate__*", "ddaepp.transport.x_velocity_loss__*",
             "ddaepp.linear_probe.xǁBatchedLinearProbeǁforward__*", "ddaepp.linear_probe.x_epoch_batches__*",
             "ddaepp.sample.x_noise_and_labels__*", "ddaepp.objectives.x_draw_step__*",
             "ddaepp.objectives.csd.xǁContrastiveSelfDistillationǁdraw__*"]
# The fast tests of those functions (seconds each; nothing that trains a diffusion model).
TESTS = ["tests/test_transport.py",
         "tests/test_metrics.py::test_scores_agree_with_adm_on_wide_features",
         "tests/test_metrics.py::test_bootstrap_replicates_are_paired_and_recompute_from_features",
         "tests/test_metrics.py::test_bootstrap_indices_cover_every_sample_and_the_interval_is_the_central_one",
         "tests/test_report.py::test_mcnemar_exact_and_bootstrap_interval",
         "tests/test_report.py::test_clear_differences_are_marked_null_ones_are_not",
         "tests/test_report.py::test_no_mark_without_replicates_and_it_says_so",
         "tests/test_report.py::test_several_seeds_need_every_seed_and_the_spread",
         "tests/test_report.py::test_no_lp_mark_without_stored_predictions",
         "tests/test_report.py::test_bootstrap_interval_is_the_central_95_percent_of_the_paired_differences",
         "tests/test_report.py::test_mcnemar_p_value_is_the_two_sided_binomial_of_the_discordant_images",
         "tests/test_report.py::test_lp_test_reads_the_two_probes_val_predictions",
         "tests/test_report.py::test_across_seeds_needs_every_seed_beyond_noise_in_one_direction_and_the_t_test",
         "tests/test_probe.py::test_batched_probe_equals_independent_probes",
         "tests/test_probe.py::test_epoch_batches_shuffle_every_row_once_by_seed_and_epoch",
         "tests/test_probe.py::test_separable_features_reach_full_accuracy",
         "tests/test_probe.py::test_memory_budget_does_not_change_results",
         "tests/test_probe.py::test_probe_epochs_cycle_through_the_draws",
         "tests/test_probe.py::test_floor_probe_same_recipe_and_converges",
         "tests/test_sample.py::test_labels_are_uniform_over_the_classes_and_never_null",
         "tests/test_sample.py::test_noise_and_labels_depend_on_seed_and_index_only",
         "tests/test_objectives.py::test_step_draws_are_the_global_batchs_rows",
         "tests/test_objectives.py::test_objective_reaches_exactly_the_blocks_up_to_its_layer"]


def mutmut_settings(tests: list[str]) -> str:
    def toml_list(items):
        return "[" + ", ".join(f'"{item}"' for item in items) + "]"

    return (f"\n[tool.mutmut]\nsource_paths = [\"src\"]\nonly_mutate = {toml_list(FILES)}\n"
            f"also_copy = [\"config.yaml\", \"config\"]\n"
            f"pytest_add_cli_args = [\"-q\", \"-p\", \"no:cacheprovider\"]\n"
            # mutmut's timeout is wall-clock from submission: generous, so a loaded machine does not
            # turn slow workers into 'timeouts' (which are counted apart from kills below)
            f"timeout_multiplier = 10.0\ntimeout_constant = 10.0\n"
            f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n")


def prepare(work: Path, tests_from: str | None) -> list[str]:
    """The scratch copy mutmut runs in; returns the selected tests that exist in its tests/."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "config", work / "config")
    shutil.copy(REPO / "config.yaml", work / "config.yaml")
    if tests_from:
        archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=REPO, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(work)], input=archive.stdout, check=True)
    else:
        shutil.copytree(REPO / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    present = [t for t in TESTS if (work / t.split("::")[0]).is_file()
               and ("::" not in t or f"def {t.split('::')[1]}(" in (work / t.split("::")[0]).read_text())]
    pyproject = (REPO / "pyproject.toml").read_text()
    (work / "pyproject.toml").write_text(pyproject + mutmut_settings(present))
    return present


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests-from", help="take tests/ from this git revision (e.g. the commit before new assertions)")
    parser.add_argument("--work", type=Path, help="scratch folder (default results/mutation/<revision or 'tree'>)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel")
    args = parser.parse_args()
    work = args.work or REPO / "results" / "mutation" / (args.tests_from or "tree")
    present = prepare(work, args.tests_from)
    print(f"{len(present)} of {len(TESTS)} test selections present; scratch copy {work}", flush=True)
    mutmut = Path(sys.executable).with_name("mutmut")
    # Each mutant's tests run in a process forked from mutmut's: without tqdm's monitor thread
    # (TQDM_DISABLE), whose lock a fork can inherit held, and with torch on one thread (conftest).
    env = dict(os.environ, TQDM_DISABLE="1")
    subprocess.run([str(mutmut), "run", "--max-children", str(args.jobs), *FUNCTIONS], cwd=work, env=env, check=False)
    listing = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=work, capture_output=True, text=True,
                             check=True).stdout
    status = dict(re.findall(r"^\s+(\S+): (.+)$", listing, re.M))
    mine = {name: s for name, s in status.items() if any(fnmatch.fnmatch(name, f) for f in FUNCTIONS)}
    killed = sum(s == "killed" for s in mine.values())
    print("\nnot killed (survivors are explained in tests/mutation/survivors.md):")
    for name, s in sorted(mine.items()):
        if s != "killed":
            print(f"  {name}: {s}")
    counts = {s: sum(v == s for v in mine.values()) for s in sorted(set(mine.values()))}
    print(f"\n{counts}")
    print(f"mutation score: {killed}/{len(mine)} killed = {100 * killed / max(len(mine), 1):.1f}%")
    print(f"(see one mutant: cd {work} && {mutmut} show NAME)")


if __name__ == "__main__":
    main()
